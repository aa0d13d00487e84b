//! Times one AdamW step on CPU: `cargo run --release --example bench_adamw [N_PARAMS]`.
//!
//! Reference (2-core dev box, 1e7 f32 params): fused in-place kernels ~3 ns/param; the
//! equivalent chain of allocating candle ops measured ~75 ns/param.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use mor::train::{AdamW, AdamWConfig, NamedParam};

fn main() -> mor::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|e| mor::MorError::Config(format!("N_PARAMS {s:?}: {e}")))?,
        None => 10_000_000,
    };
    let rows = (n / 4 / 1024).max(1);
    let mut params = Vec::new();
    let mut loss: Option<Tensor> = None;
    for i in 0..4 {
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 1024), &Device::Cpu)?)?;
        let l = v.as_tensor().sqr()?.sum_all()?;
        loss = Some(match loss {
            None => l,
            Some(x) => (x + l)?,
        });
        params.push(NamedParam::new(format!("p{i}.weight"), v));
    }
    let loss = loss.ok_or_else(|| mor::MorError::Config("no parameters".into()))?;
    let grads = loss.backward()?;
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    opt.step(&grads, 1e-3)?; // warm-up: first touch of the moment buffers
    let iters = 5;
    let t = Instant::now();
    for _ in 0..iters {
        opt.step(&grads, 1e-3)?;
    }
    let dt = t.elapsed().as_secs_f64() / iters as f64;
    let total = 4 * rows * 1024;
    println!(
        "{total} params: {:.1} ms/step, {:.2} ns/param",
        dt * 1e3,
        dt * 1e9 / total as f64
    );
    Ok(())
}
