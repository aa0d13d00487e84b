//! The engine's row kernels (paper §3.3's depth-wise batched rows): RMSNorm, RoPE, GQA attention over per-sequence
//! caches, and matmuls on dense or quantized weights, as plain loops over f32 rows. At decode sizes candle's per-op
//! overhead, not arithmetic, dominates, so everything between the matmuls runs here (measured; docs/benchmarks.md).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::cache::LayerKv;
use crate::engine::dense;
use crate::engine::dense::SyncPtr;
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
    let runs = same_sequence_runs(items);
    if runs.iter().any(|r| r.len() >= MIN_BLOCK_ROWS) {
        for r in runs {
            let (q, o) = (
                &q[r.start * q_stride..],
                &mut out[r.start * nh * hd..r.end * nh * hd],
            );
            if r.len() >= MIN_BLOCK_ROWS {
                attend_block(q, q_stride, &items[r], o, nh, nkv, hd);
            } else {
                attend_rows(q, q_stride, &items[r], o, nh, nkv, hd);
            }
        }
        return out;
    }
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

/// Runs of at least this many consecutive rows of one sequence (a prompt chunk) attend as matrix products.
const MIN_BLOCK_ROWS: usize = 16;

/// Maximal runs of consecutive rows that read the same cache at increasing positions.
fn same_sequence_runs(items: &[(&LayerKv, u32)]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (c, p)) in items.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if std::ptr::eq(items[i - 1].0, *c) && items[i - 1].1 < *p => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// Attention of a run of rows of one sequence (positions increasing) over its cache, one query head at a time as
/// two GEMMs: S = Q_h K_gᵀ · scale over every entry the last row sees, the causal part of each row's softmax, then
/// P V_g. Computing the full rectangle wastes the masked half, but a GEMM is an order of magnitude faster than the
/// row loop (prefill profile, docs/benchmarks.md). Heads run in parallel on the engine's pool.
fn attend_block(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    out: &mut [f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let (cache, n) = (items[0].0, items.len());
    let m = cache.visible(items[n - 1].1);
    let visible: Vec<usize> = items.iter().map(|(c, p)| c.visible(*p)).collect();
    let (rep, row, ow) = (nh / nkv, nkv * hd, nh * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let dst = SyncPtr(out.as_mut_ptr());
    let head = |h: usize| {
        let g = h / rep;
        let mut s = crate::alloc::filled_vec(n * m);
        // SAFETY: every operand lies inside its slice: Q_h is n rows of hd at stride q_stride from h·hd in q
        // (q holds n rows of q_stride ≥ nh·hd); K_g and V_g are m rows of hd at stride nkv·hd from g·hd in the
        // cache (m entries); S is n × m; the output head h is n rows of hd at stride nh·hd in out, written by
        // this head only.
        unsafe {
            gemm::gemm(
                n,
                m,
                hd,
                s.as_mut_ptr(),
                1,
                m as isize,
                false,
                q.as_ptr().add(h * hd),
                1,
                q_stride as isize,
                cache.k.as_ptr().add(g * hd),
                row as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, r) in s.chunks_exact_mut(m).enumerate() {
            let (live, dead) = r.split_at_mut(visible[i]);
            let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in live.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            live.iter_mut().for_each(|v| *v /= sum);
            dead.fill(0.0);
        }
        // SAFETY: as above.
        unsafe {
            gemm::gemm(
                n,
                hd,
                m,
                dst.get().add(h * hd),
                1,
                ow as isize,
                false,
                s.as_ptr(),
                1,
                m as isize,
                cache.v.as_ptr().add(g * hd),
                1,
                row as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    crate::engine::pool::run(nh, &head);
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
