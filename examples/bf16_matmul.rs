//! The three ways the engine can multiply activations by bf16 weights, timed side by side on one shape:
//! `engine::gemm_bf16` (AVX512-BF16 dot products, activations rounded to bf16), the row kernels of `engine::dense`
//! (weights widened in registers) and candle's f32 GEMM on the widened matrix. GFLOP/s, median of 5 interleaved
//! rounds, on the engine's pool (all cores unless RAYON_NUM_THREADS says otherwise).
//!
//! ```sh
//! cargo run --release --example bf16_matmul -- [ROWS K OUT]   # default 512 576 3072 (SmolLM2's gate/up at a prompt)
//! ```

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use mor::engine::{dense, gemm_bf16};

/// One matmul path: `x · Wᵀ` as a flat [n, m] Vec.
type Path<'a> = &'a dyn Fn() -> Result<Vec<f32>>;

fn main() -> Result<()> {
    mor::engine::pin_thread_count();
    let dims: Option<Vec<usize>> = std::env::args().skip(1).map(|a| a.parse().ok()).collect();
    let (n, k, m) = match dims.as_deref() {
        Some([]) => (512, 576, 3072),
        Some(&[n, k, m]) if n > 0 && k > 0 && m > 0 => (n, k, m),
        _ => bail!("usage: bf16_matmul [ROWS K OUT] (three positive integers)"),
    };
    let w: Vec<bf16> = (0..m * k)
        .map(|i| bf16::from_f32(((i * 7 % 13) as f32 - 6.0) / 50.0))
        .collect();
    let x: Vec<f32> = (0..n * k)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) / 30.0)
        .collect();
    let wt = Tensor::from_slice(&w, (m, k), &Device::Cpu)?;
    let reps = (8 * 512 * 3072 / (n * m)).max(1);
    let time = |f: &dyn Fn() -> Result<Vec<f32>>| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(f()?);
        }
        Ok(2.0 * (n * k * m) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    let gemm = || -> Result<Vec<f32>> { Ok(gemm_bf16::matmul(&[&w[..]], &x, n)) };
    let rows = || -> Result<Vec<f32>> { Ok(dense::matmul_rows(&[&w[..]], &x, n)) };
    let candle = || -> Result<Vec<f32>> {
        let xt = Tensor::from_slice(&x, (n, k), &Device::Cpu)?;
        let y = xt.matmul(&wt.to_dtype(DType::F32)?.t()?)?;
        Ok(y.flatten_all()?.to_vec1()?)
    };
    let mut paths: Vec<(&str, Path, Vec<f64>)> = vec![
        ("engine::dense row kernels", &rows, Vec::new()),
        ("candle f32 GEMM (widened)", &candle, Vec::new()),
    ];
    if gemm_bf16::available() {
        paths.insert(0, ("engine::gemm_bf16", &gemm, Vec::new()));
    } else {
        println!("this CPU has no AVX512-BF16: engine::gemm_bf16 not timed");
    }
    for _ in 0..5 {
        for (_, f, r) in paths.iter_mut() {
            r.push(time(*f)?);
        }
    }
    println!("{}", mor::bench::model::cpu_line());
    println!(
        "x [{n}, {k}] · Wᵀ, W bf16 [{m}, {k}], {} threads:",
        mor::engine::num_threads()
    );
    for (name, _, mut r) in paths {
        r.sort_by(f64::total_cmp);
        println!("  {name:28} {:7.1} GFLOP/s (median of 5)", r[2]);
    }
    Ok(())
}
