//! The engine's row kernels (paper §3.3's depth-wise batched rows): RMSNorm, RoPE and matmuls on dense or quantized
//! weights, as plain loops over f32 rows (attention over the caches is [`crate::engine::attention`]). At decode sizes candle's per-op
//! overhead, not arithmetic, dominates, so everything between the matmuls runs here (measured; docs/benchmarks.md).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::dense;
use crate::engine::quant::QMatrix;
use crate::error::{MorError, Result};

/// A matmul weight of the engine.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// f32 or bf16 row blocks stacked along the output dimension (each [out_i, in], contiguous): the model's own
    /// tensors, so a fused projection (q/k/v, gate/up) costs no copy. Few rows run [`dense::matmul_rows`] over the
    /// blocks, more run candle's f32 GEMM per block.
    Dense(Vec<Tensor>),
    /// A GGUF tensor in its stored format, [out, in], multiplied by the engine's quantized kernels (the activations
    /// are quantized to 8 bits, as llama.cpp does); prefill-sized batches widen it to f32 for the call instead.
    Quantized(Arc<QMatrix>),
}

/// RMSNorm of each row of `x` ([n, d], d = w.len()): x / sqrt(mean(x²) + ε) · w.
pub(crate) fn rms_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for r in x.chunks_exact(d) {
        let inv = 1.0 / (dot(r, r) / d as f32 + eps).sqrt();
        out.extend(r.iter().zip(w).map(|(&a, &b)| a * inv * b));
    }
    out
}

/// Batches of at least this many rows on quantized weights widen the blocks to f32 and run the f32 GEMM; fewer run
/// the integer kernels (measured crossover; see docs/benchmarks.md).
const MIN_ROWS_DEQUANTIZED: usize = 64;

/// `x · Wᵀ` for rows x [n, k] (owned, moved into the tensor) and a weight [m, k], as a flat Vec [n, m].
pub(crate) fn matmul_rows(x: Vec<f32>, n: usize, w: &Weight) -> Result<Vec<f32>> {
    let k = x.len() / n.max(1);
    match w {
        Weight::Quantized(q) if n >= MIN_ROWS_DEQUANTIZED => {
            // Prefill-sized batches: widen the blocks to f32 once for this call and run the f32 GEMM. The pass
            // over the weights costs ~1/n of the GEMM, less than the per-block float work of the integer kernels
            // (measured; docs/benchmarks.md).
            let (m, cols) = (q.rows(), q.cols());
            let mut w = crate::alloc::filled_vec(m * cols);
            for (r, row) in w.chunks_exact_mut(cols).enumerate() {
                q.dequantize_row(r, row);
            }
            let dev = candle_core::Device::Cpu;
            let w = Tensor::from_vec(w, (m, cols), &dev)?;
            Ok(Tensor::from_vec(x, (n, k), &dev)?
                .matmul(&w.t()?)?
                .flatten_all()?
                .to_vec1()?)
        }
        Weight::Quantized(q) => Ok(q.matmul(&x, n)),
        Weight::Dense(blocks) => {
            let bf16 = blocks.iter().any(|b| b.dtype() == DType::BF16);
            // bf16 blocks would be widened to f32 for every GEMM call: their own kernel pays off to more rows.
            if n <= if bf16 {
                dense::MAX_ROWS_BF16
            } else {
                dense::MAX_ROWS
            } {
                return dense_rows(blocks, &x, n);
            }
            let x = Tensor::from_vec(x, (n, k), blocks[0].device())?;
            let parts = blocks
                .iter()
                .map(|b| x.matmul(&b.to_dtype(DType::F32)?.t()?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 1)?.flatten_all()?.to_vec1()?)
        }
    }
}

/// [`dense::matmul_rows`] on the storage of `blocks` (all f32 or all bf16, contiguous, on the CPU).
fn dense_rows(blocks: &[Tensor], x: &[f32], n: usize) -> Result<Vec<f32>> {
    use candle_core::{CpuStorage, Storage};
    let guards: Vec<_> = blocks.iter().map(|b| b.storage_and_layout()).collect();
    let (mut f32s, mut bf16s) = (Vec::new(), Vec::new());
    for (storage, layout) in &guards {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => f32s.push(&v[a..b]),
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => bf16s.push(&v[a..b]),
            _ => {
                return Err(MorError::Config(
                    "dense engine weights must be contiguous f32 or bf16 on the CPU".into(),
                ))
            }
        }
    }
    match (f32s.is_empty(), bf16s.is_empty()) {
        (false, true) => Ok(dense::matmul_rows(&f32s, x, n)),
        (true, false) => Ok(dense::matmul_rows(&bf16s, x, n)),
        _ => Err(MorError::Config(
            "a stacked engine weight mixes f32 and bf16 blocks".into(),
        )),
    }
}

/// Rotate one head vector in place with the cos/sin rows of its position.
#[inline]
pub(crate) fn rope_in_place(x: &mut [f32], c: &[f32], s: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
    }
}

pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Dot product in 8 independent lanes so the compiler vectorises it (a single f32 accumulator cannot be reordered).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The engine's thread count: the matmul [`pool`](crate::engine::pool)'s, which candle's matmuls are pinned to as
/// well ([`pin_thread_count`]).
pub fn num_threads() -> usize {
    crate::engine::pool::threads()
}

/// Pin candle's thread count (RAYON_NUM_THREADS) to the engine's, once, at program start-up: candle asks for it on
/// every matmul and without the variable re-reads /proc each time (a quarter of batch-1 decode time in a profile).
/// A RAYON_NUM_THREADS already set sets the engine's count too. Call before any other thread exists (it sets an
/// environment variable).
pub fn pin_thread_count() {
    match std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) if n > 0 => {
            crate::engine::pool::set_threads(n);
        }
        _ => {
            set_thread_count(num_threads());
        }
    }
}

/// Set the thread count of the engine and of candle (a `--threads` flag): call before any model work and before
/// any other thread exists (it sets RAYON_NUM_THREADS). Returns false when the engine's pool had already started
/// with another count.
pub fn set_thread_count(n: usize) -> bool {
    std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    crate::engine::pool::set_threads(n)
}
