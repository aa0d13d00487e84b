//! The engine's row kernels (paper §3.3's depth-wise batched rows): RMSNorm, RoPE, GQA attention over per-sequence
//! caches, and matmuls on dense or quantized weights, as plain loops over f32 rows. At decode sizes candle's per-op
//! overhead, not arithmetic, dominates, so everything between the matmuls runs here (measured; docs/benchmarks.md).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::cache::LayerKv;
use crate::engine::dense;
use crate::engine::quant::QMatrix;
use crate::error::{MorError, Result};

/// A matmul weight of the engine.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// f32 [out, in] (contiguous): few rows run [`dense::matmul_rows`], more run candle's GEMM on the transposed
    /// view.
    Dense(Tensor),
    /// A GGUF tensor in its stored format, [out, in], multiplied by the engine's quantized kernels (the activations
    /// are quantized to 8 bits, as llama.cpp does).
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

/// `x · Wᵀ` for rows x [n, k] (owned, moved into the tensor) and a weight [m, k], as a flat Vec [n, m].
pub(crate) fn matmul_rows(x: Vec<f32>, n: usize, w: &Weight) -> Result<Vec<f32>> {
    let k = x.len() / n.max(1);
    match w {
        Weight::Quantized(q) => Ok(q.matmul(&x, n)),
        Weight::Dense(w) if n <= dense::MAX_ROWS => {
            let (storage, layout) = w.storage_and_layout();
            let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Err(MorError::Config(
                    "dense engine weights must be contiguous f32 on the CPU".into(),
                ));
            };
            Ok(dense::matmul_rows(&v[a..b], w.dim(0)?, &x, n))
        }
        Weight::Dense(w) => Ok(Tensor::from_vec(x, (n, k), w.device())?
            .matmul(&w.t()?)?
            .flatten_all()?
            .to_vec1()?),
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

/// Attention of query rows `q` ([n, ·] with stride `q_stride`, the first H·hd of each row are the rotated queries) each over its own cache (`items[i]`: the cache and the query's
/// position; entries at positions ≤ it are visible). GQA: query head h reads key head h / (H / kv) (HF repeat_kv).
/// Returns [n, H·hd]. Rows are independent, so large batches are split across threads.
pub(crate) fn attend(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    let n = items.len();
    let mut out = crate::alloc::filled_vec(n * nh * hd);
    let work: usize = items.iter().map(|(c, p)| c.visible(*p)).sum::<usize>() * nh * hd;
    let threads = num_threads().clamp(1, n.max(1));
    // Below ~1 MFLOP a thread costs more than it saves.
    if threads == 1 || work < 250_000 {
        attend_rows(q, q_stride, items, &mut out, nh, nkv, hd);
        return out;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for ((qc, ic), oc) in q
            .chunks(per * q_stride)
            .zip(items.chunks(per))
            .zip(out.chunks_mut(per * nh * hd))
        {
            s.spawn(move || attend_rows(qc, q_stride, ic, oc, nh, nkv, hd));
        }
    });
    out
}

fn attend_rows(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    out: &mut [f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = nkv * hd;
    let mut scores: Vec<f32> = Vec::new();
    for (i, (cache, p)) in items.iter().enumerate() {
        let m = cache.visible(*p);
        let qi = &q[i * q_stride..i * q_stride + nh * hd];
        let oi = &mut out[i * nh * hd..(i + 1) * nh * hd];
        scores.clear();
        scores.resize(nh * m, 0.0);
        for j in 0..m {
            let kj = &cache.k[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                scores[h * m + j] =
                    dot(&qi[h * hd..(h + 1) * hd], &kj[g * hd..(g + 1) * hd]) * scale;
            }
        }
        for h in 0..nh {
            let s = &mut scores[h * m..(h + 1) * m];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in s.iter_mut() {
                *v *= inv;
            }
        }
        for j in 0..m {
            let vj = &cache.v[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                let w = scores[h * m + j];
                let (o, v) = (&mut oi[h * hd..(h + 1) * hd], &vj[g * hd..(g + 1) * hd]);
                for (a, b) in o.iter_mut().zip(v) {
                    *a += w * b;
                }
            }
        }
    }
}
