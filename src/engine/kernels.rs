//! The engine's row kernels (paper §3.3's depth-wise batched rows): RMSNorm, RoPE and matmuls on dense or quantized
//! weights, as plain loops over f32 rows (attention over the caches is [`crate::engine::attention`]). At decode sizes candle's per-op
//! overhead, not arithmetic, dominates, so everything between the matmuls runs here (measured; docs/benchmarks.md).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::quant::QMatrix;
use crate::engine::{dense, gemm_bf16, gemm_f32};
use crate::error::{MorError, Result};

/// A matmul weight of the engine.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// f32 or bf16 row blocks stacked along the output dimension (each [out_i, in], contiguous): the model's own
    /// tensors, so a fused projection (q/k/v, gate/up) costs no copy. Few rows run [`dense::matmul_rows`] over the
    /// blocks, more run [`gemm_bf16::matmul`] (bf16 blocks, where the CPU has AVX512-BF16) or [`gemm_f32::matmul`].
    Dense(Vec<Tensor>),
    /// A GGUF tensor in its stored format, [out, in], multiplied by the engine's quantized kernels (the activations
    /// are quantized to 8 bits, as llama.cpp does); prefill-sized batches widen it for the call instead (to bf16
    /// for [`gemm_bf16::matmul`] where the CPU has AVX512-BF16, else to f32, block by block, for [`gemm_f32::matmul`]).
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

/// Batches of at least this many rows on quantized weights widen the blocks (to bf16 or f32) and run a GEMM; fewer
/// run the integer kernels (measured crossover; see docs/benchmarks.md).
const MIN_ROWS_DEQUANTIZED: usize = 64;

/// `x · Wᵀ` for rows x [n, k] and a weight [m, k], as a flat Vec [n, m].
pub(crate) fn matmul_rows(x: &[f32], n: usize, w: &Weight) -> Result<Vec<f32>> {
    match w {
        Weight::Quantized(q) if n >= MIN_ROWS_DEQUANTIZED => {
            // Prefill-sized batches: widen the blocks for this call and run a GEMM. The pass over the weights
            // costs ~1/n of the GEMM, less than the per-block float work of the integer kernels (measured;
            // docs/benchmarks.md).
            let (m, cols) = (q.rows(), q.cols());
            if gemm_bf16::available() {
                // With the CPU's bf16 dot products: weights widened only to bf16 (an error of 2⁻⁹ per weight at
                // most, below the 8-bit activations' of the integer path), twice the f32 GEMM's rate.
                let mut wb = crate::alloc::filled_vec(m * cols);
                let mut row = vec![0f32; cols];
                for (r, out) in wb.chunks_exact_mut(cols).enumerate() {
                    q.dequantize_row(r, &mut row);
                    gemm_bf16::round_to_bf16(&row, out);
                }
                return Ok(gemm_bf16::matmul(&[&wb], x, n));
            }
            Ok(gemm_f32::matmul(x, n, m, |r0, buf| {
                for (i, row) in buf.chunks_exact_mut(cols).enumerate() {
                    q.dequantize_row(r0 + i, row);
                }
            }))
        }
        Weight::Quantized(q) => Ok(q.matmul(x, n)),
        Weight::Dense(blocks) => dense_matmul(blocks, x, n),
    }
}

/// `x · Wᵀ` on the storage of `blocks` (all f32 or all bf16, contiguous, on the CPU, stacked along the output
/// dimension): few rows on [`dense::matmul_rows`], more on [`gemm_f32::matmul`] (bf16 rows widened per block) or,
/// where the CPU has AVX512-BF16, bf16 weights at every size on gemm_bf16's arithmetic.
fn dense_matmul(blocks: &[Tensor], x: &[f32], n: usize) -> Result<Vec<f32>> {
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
    let k = x.len() / n.max(1);
    match (f32s.is_empty(), bf16s.is_empty()) {
        (false, true) if n <= dense::MAX_ROWS => Ok(dense::matmul_rows(&f32s, x, n)),
        (false, true) => Ok(gemm_f32::matmul(x, n, stacked_rows(&f32s, k), |r0, buf| {
            fill_stacked(&f32s, k, r0, buf, |v| v)
        })),
        (true, false) if gemm_bf16::available() => Ok(if n >= gemm_bf16::MIN_ROWS {
            gemm_bf16::matmul(&bf16s, x, n)
        } else {
            // gemm_bf16's arithmetic (activations rounded to bf16, whose products with bf16 weights are exact in
            // f32) on the row kernels, which stream the weights faster at 1–3 rows: a sequence's logits do not
            // depend on the size of the batch it runs in, beyond the order of summation.
            dense::matmul_rows(&bf16s, &gemm_bf16::rounded(x), n)
        }),
        // bf16 rows are widened per block for the GEMM: these kernels, which widen in registers, pay off to more
        // rows than with f32 weights.
        (true, false) if n <= dense::MAX_ROWS_BF16 => Ok(dense::matmul_rows(&bf16s, x, n)),
        (true, false) => Ok(gemm_f32::matmul(
            x,
            n,
            stacked_rows(&bf16s, k),
            |r0, buf| fill_stacked(&bf16s, k, r0, buf, half::bf16::to_f32),
        )),
        _ => Err(MorError::Config(
            "a stacked engine weight mixes f32 and bf16 blocks".into(),
        )),
    }
}

/// Rows of the weight blocks `blocks` ([m_i, k] each) stacked.
fn stacked_rows<T>(blocks: &[&[T]], k: usize) -> usize {
    blocks.iter().map(|b| b.len() / k.max(1)).sum()
}

/// Write rows r0.. of the stacked `blocks` ([m_i, k] each), as many as `buf` holds, into `buf` as f32.
fn fill_stacked<T: Copy>(
    blocks: &[&[T]],
    k: usize,
    r0: usize,
    buf: &mut [f32],
    f: impl Fn(T) -> f32,
) {
    for (i, out) in buf.chunks_exact_mut(k).enumerate() {
        let mut r = r0 + i;
        for b in blocks {
            let rows = b.len() / k;
            if r < rows {
                for (o, &v) in out.iter_mut().zip(&b[r * k..(r + 1) * k]) {
                    *o = f(v);
                }
                break;
            }
            r -= rows;
        }
    }
}

/// An elementwise loop written on plain f32 lanes for the compiler to vectorise, compiled once per vector ISA by
/// [`vectorised`] (a plain build targets SSE2 only). `run` must be `#[inline(always)]` so that it is compiled inside
/// the target-feature wrapper.
trait Lanes {
    fn run(self);
}

/// Run `f` compiled for AVX-512 or AVX2 + FMA where the CPU has them (detected at run time), else as it is.
fn vectorised<F: Lanes>(f: F) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<F: Lanes>(f: F) {
            f.run()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<F: Lanes>(f: F) {
            f.run()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { avx2(f) };
        }
    }
    f.run()
}

/// e^x without a libm call, so loops over it vectorise: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (Cody–Waite: ln 2 in
/// two parts), e^r by Cephes' degree-7 polynomial for `expf`, 2^n through the exponent bits. Within a few ulp of
/// `f32::exp` (tested); inputs are clamped to [−87.3, 88.3], so e^x of a very negative x is ~1e-38, not 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // 1.5 · 2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // n = the integer in t's low bits; 2^n as the f32 with exponent n + 127 (n ∈ [−126, 127] after the clamp).
    // (Wrapping: a NaN input gives NaN, never an overflow panic in a debug build.)
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits((n.wrapping_add(127) << 23) as u32)
}

/// Softmax of each `width`-wide row of `v` in place, over its first `live[i]` entries (at most `width`); the rest
/// are set to 0.
pub(crate) fn softmax_rows(v: &mut [f32], width: usize, live: &[usize]) {
    struct Softmax<'a>(&'a mut [f32], usize, &'a [usize]);
    impl Lanes for Softmax<'_> {
        #[inline(always)]
        fn run(self) {
            let Softmax(v, width, live) = self;
            for (r, &n) in v.chunks_exact_mut(width).zip(live) {
                let (r, dead) = r.split_at_mut(n.min(width));
                dead.fill(0.0);
                // 16 lanes (no reduction order imposed on the compiler), then the lanes.
                let mut m = [f32::NEG_INFINITY; 16];
                let mut c = r.chunks_exact(16);
                for x in c.by_ref() {
                    for l in 0..16 {
                        m[l] = if x[l] > m[l] { x[l] } else { m[l] };
                    }
                }
                let max = c
                    .remainder()
                    .iter()
                    .chain(&m)
                    .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = [0f32; 16];
                let mut c = r.chunks_exact_mut(16);
                for x in c.by_ref() {
                    for l in 0..16 {
                        x[l] = exp_f32(x[l] - max);
                        sum[l] += x[l];
                    }
                }
                let mut total: f32 = sum.iter().sum();
                for x in c.into_remainder() {
                    *x = exp_f32(*x - max);
                    total += *x;
                }
                let inv = 1.0 / total;
                r.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }
    vectorised(Softmax(v, width, live));
}

/// SwiGLU of rows `[gate | up]` (each 2f wide): silu(gate) · up, as rows of f.
pub(crate) fn swiglu_rows(gu: &[f32], f: usize) -> Vec<f32> {
    struct SwiGlu<'a>(&'a [f32], &'a mut [f32], usize);
    impl Lanes for SwiGlu<'_> {
        #[inline(always)]
        fn run(self) {
            let SwiGlu(gu, out, f) = self;
            for (r, o) in gu.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
                let (g, u) = r.split_at(f);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + exp_f32(-g)) * u;
                }
            }
        }
    }
    let mut out = crate::alloc::filled_vec(gu.len() / 2);
    vectorised(SwiGlu(gu, &mut out, f));
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_dense_weights_give_the_f64_product_at_every_batch_size() {
        // Two stacked blocks (a fused projection): every row count from the row kernels to the blocked GEMM, whose
        // jobs straddle the blocks' boundary; f32 and bf16 (values exact in bf16, so both have one reference).
        let k = 96;
        let rows = [150usize, 37];
        let val = |i: usize| half::bf16::from_f32(((i * 7919) % 255) as f32 / 64.0 - 2.0).to_f32();
        let w: Vec<Vec<f32>> = rows
            .iter()
            .enumerate()
            .map(|(b, &m)| (0..m * k).map(|i| val(i + b * 100_000)).collect())
            .collect();
        for n in [1, 3, dense::MAX_ROWS + 1, dense::MAX_ROWS_BF16 + 1, 130] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 199) as f32 / 99.0 - 1.0)
                .collect();
            for dtype in [DType::F32, DType::BF16] {
                let blocks: Vec<Tensor> = w
                    .iter()
                    .zip(rows)
                    .map(|(b, m)| {
                        Tensor::from_vec(b.clone(), (m, k), &candle_core::Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let y = matmul_rows(&x, n, &Weight::Dense(blocks)).unwrap();
                let m: usize = rows.iter().sum();
                // gemm_bf16's arithmetic rounds the activations to bf16: compare within that rounding there.
                let tol = if dtype == DType::BF16 && gemm_bf16::available() {
                    1e-2
                } else {
                    1e-4
                };
                for a in 0..n {
                    let mut c = 0;
                    for (b, &mb) in w.iter().zip(&rows) {
                        for r in 0..mb {
                            let want: f64 = (0..k)
                                .map(|t| f64::from(x[a * k + t]) * f64::from(b[r * k + t]))
                                .sum();
                            let got = f64::from(y[a * m + c]);
                            assert!(
                                (got - want).abs() <= tol * k as f64,
                                "{dtype:?} n={n} ({a}, {c})"
                            );
                            c += 1;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp_f32(x)) - want) / want).abs());
        }
        assert!(
            worst < 4.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert!(exp_f32(-1e4) < 1e-37 && exp_f32(-1e4) >= 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_and_swiglu_match_f64() {
        let (width, live) = (37usize, [37usize, 1, 20, 16]);
        let v: Vec<f32> = (0..4 * width)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let mut s = v.clone();
        softmax_rows(&mut s, width, &live);
        for (i, &n) in live.iter().enumerate() {
            let r = &v[i * width..i * width + n];
            let max = r
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
            let z: f64 = r.iter().map(|&x| (f64::from(x) - max).exp()).sum();
            for j in 0..width {
                let want = if j < n {
                    (f64::from(r[j]) - max).exp() / z
                } else {
                    0.0
                };
                assert!((f64::from(s[i * width + j]) - want).abs() < 1e-6, "{i} {j}");
            }
        }
        let f = 21;
        let gu: Vec<f32> = (0..3 * 2 * f)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let act = swiglu_rows(&gu, f);
        assert_eq!(act.len(), 3 * f);
        for (a, r) in act.chunks_exact(f).zip(gu.chunks_exact(2 * f)) {
            for j in 0..f {
                let (g, u) = (f64::from(r[j]), f64::from(r[f + j]));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((f64::from(a[j]) - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }
}
