//! `mor bench machine`: the GEMM GFLOP/s and memory GB/s of this machine at the engine's shapes, which say which
//! regime (bandwidth- or compute-bound) each batch size of `mor bench generate` is in.

use std::fmt;
use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bench::{load_average, median};
use crate::error::Result;

/// Measured compute and memory speed of this machine at the engine's shapes (`mor bench machine`), to say which
/// regime each batch size is in: a GEMM of m rows against a [k, n] weight does 2·m·k·n FLOPs on 4·k·n weight bytes,
/// so it is bandwidth-bound when m < (GFLOP/s) / (2 · GB/s / 4) rows and compute-bound above.
#[derive(Debug, Clone)]
pub struct MachineReport {
    /// candle's thread count during the run.
    pub threads: usize,
    /// (m, k, n, median GFLOP/s) of `x[m, k] @ w[k, n]` in f32 through candle (as the engine's `matmul_rows`).
    pub gemm: Vec<(usize, usize, usize, f64)>,
    /// (buffer bytes, median GB/s) of one thread summing a buffer of f32 (L2-, L3- and DRAM-sized buffers).
    pub read: Vec<(usize, f64)>,
    /// Load averages before and after.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
}

/// Median seconds of `f` over 5 repetitions, each repeated until it lasts at least 20 ms (returns seconds per call).
fn time_median(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut reps = 1usize;
    loop {
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        if t0.elapsed().as_secs_f64() >= 0.02 || reps >= 1 << 20 {
            break;
        }
        reps *= 2;
    }
    let mut v = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        v.push(t0.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(median(&v))
}

/// Sum of a buffer in 16 independent lanes (vectorised by the compiler; the lanes hide the add latency, so the loop
/// runs at the speed the memory system delivers the data).
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum()
}

/// Measure GEMM GFLOP/s at the shapes of a layer of width `d` (FFN `3d`, the benchmark's GQA with half the heads
/// as KV heads) and LM head of `vocab`, for each row count in `rows`, and single-thread read bandwidth.
pub fn bench_machine(
    d: usize,
    heads: usize,
    vocab: usize,
    rows: &[usize],
) -> Result<MachineReport> {
    let load_before = load_average();
    let dev = Device::Cpu;
    let hd = d / heads.max(1);
    let kv = (heads / 2).max(1) * hd;
    let f = 3 * d;
    let shapes = [(d, d + 2 * kv), (d, d), (d, 2 * f), (f, d), (d, vocab)];
    let mut gemm = Vec::new();
    let mut rng = StdRng::seed_from_u64(3);
    for &(k, n) in &shapes {
        let w: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let w = candle_core::Tensor::from_vec(w, (k, n), &dev)?;
        for &m in rows {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let x = candle_core::Tensor::from_vec(x, (m, k), &dev)?;
            let secs = time_median(|| {
                let y = x.matmul(&w)?;
                std::hint::black_box(y);
                Ok(())
            })?;
            gemm.push((m, k, n, 2.0 * (m * k * n) as f64 / secs / 1e9));
        }
    }
    let mut read = Vec::new();
    for bytes in [512usize << 10, 8 << 20, 512 << 20] {
        let buf: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
        let secs = time_median(|| {
            std::hint::black_box(sum_lanes(std::hint::black_box(&buf)));
            Ok(())
        })?;
        read.push((bytes, bytes as f64 / secs / 1e9));
    }
    Ok(MachineReport {
        threads: crate::engine::num_threads(),
        gemm,
        read,
        load: (load_before, load_average()),
    })
}

impl fmt::Display for MachineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "machine: f32 GEMM x[m,k] @ w[k,n] through candle, threads={}; median of 5",
            self.threads
        )?;
        writeln!(f, "| k × n | m (rows) | GFLOP/s |")?;
        writeln!(f, "|---|---|---|")?;
        for &(m, k, n, g) in &self.gemm {
            writeln!(f, "| {k} × {n} | {m} | {g:.1} |")?;
        }
        writeln!(f, "single-thread read bandwidth (sum of an f32 buffer):")?;
        writeln!(f, "| buffer | GB/s |")?;
        writeln!(f, "|---|---|")?;
        for &(b, g) in &self.read {
            writeln!(f, "| {:.1} MiB | {g:.1} |", b as f64 / (1 << 20) as f64)?;
        }
        writeln!(f, "{}", crate::bench::load_line(self.load))
    }
}
