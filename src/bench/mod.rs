//! Benchmarks that compare model variants inside one process (`mor bench ...`).
//!
//! The machine is shared and noisy, so runs of the variants are interleaved round-robin, repeated, and reported as
//! medians and ratios to the vanilla baseline measured in the same run, with the load average before and after.
//!
//! - [`train`]: training step time and peak memory (`mor bench train`).
//! - [`generate`]: generation throughput under continuous depth-wise batching (`mor bench generate`).
//! - [`machine`]: GEMM GFLOP/s and read bandwidth (`mor bench machine`).
//! - [`model`]: prefill / decode tokens/s and peak memory of one model, as llama.cpp's llama-bench measures them
//!   (`mor bench model`).
//! - [`serve`]: a load generator for `mor serve` or any OpenAI-compatible server (`mor bench serve`).

pub mod generate;
pub mod machine;
pub mod model;
pub mod serve;
pub mod train;

/// The 1-, 5- and 15-minute load averages (Linux), for the record of how busy the machine was.
pub fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// "load average before: …, after: …" for a benchmark report.
pub fn load_line(load: (Option<[f64; 3]>, Option<[f64; 3]>)) -> String {
    let fmt = |l: Option<[f64; 3]>| {
        l.map_or("n/a".to_string(), |l| {
            format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])
        })
    };
    format!(
        "load average before: {}, after: {}",
        fmt(load.0),
        fmt(load.1)
    )
}

/// Median of a non-empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}
