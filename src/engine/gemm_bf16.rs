//! Matmuls on bf16 weights with the CPU's bf16 dot products (AVX512-BF16 `vdpbf16ps`), for batches of
//! [`MIN_ROWS`] rows or more (batched decoding, prefill): `y = x · Wᵀ` with x rounded to bf16 once per call and
//! products of bf16 pairs summed in f32. One instruction does 32 multiply-adds where widening the weights to f32
//! does 16; rounding the activations is the precision it trades, as llama.cpp's bf16 path does. Fewer rows run the
//! row kernels on the same rounded activations ([`rounded`]), so the batch size does not change the arithmetic.
//! Where the CPU lacks avx512_bf16, bf16 weights are widened to f32 and the activations stay f32
//! ([`crate::engine::kernels`]).

use half::bf16;

use crate::engine::dense::{row_chunks, SyncPtr};
use crate::engine::pool;

/// Batches of at least this many rows use [`matmul`] where the CPU can; fewer run the row kernels of
/// [`crate::engine::dense`] on the same rounded activations. At 4 rows of 576 × 3072 this kernel ran 287 GFLOP/s against
/// their 169 on two threads of an AMD EPYC with AVX512-BF16, at 2 rows both ~155, at 16 rows 358 against 165
/// (`examples/bf16_matmul`).
pub const MIN_ROWS: usize = 4;

/// Bytes of bf16 activation rows per cache block: the block stays in L1 (with the weight tile it meets) while
/// every 4-row weight tile of a chunk passes over it from L2. Sweeping a weight tile over many activation rows from
/// L2 instead ran at half the rate (each 576-wide row is too short a stream for the prefetcher; measured).
const BLOCK_BYTES: usize = 32 * 1024;

/// Activation rows per register tile (with four weight rows: 4·X accumulators, 4 + 1 loaded vectors, of 32
/// registers). At 5 and 6 the compiler spilled accumulators and the kernel ran slower (measured).
const X: usize = 4;

/// 4·X dot products of X activation rows with four weight rows (each of the same length): `[j][i] = x_j · w_i`.
type Tile = fn([&[bf16]; 4], [&[bf16]; X]) -> [[f32; 4]; X];

/// The tile kernel, where the CPU has AVX-512F, BW and BF16 (detected at run time).
fn tile() -> Option<Tile> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        // SAFETY: the features were detected; every row holds the same number of values (the caller's contract).
        return Some(|w, x| unsafe { x86::tile(w, x) });
    }
    None
}

/// Whether this CPU runs [`matmul`].
pub fn available() -> bool {
    tile().is_some()
}

/// `out[i] = x[i]` rounded to bf16 (to nearest even), with AVX512-BF16 where the CPU has it.
pub fn round_to_bf16(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len(), "round_to_bf16 lengths");
    #[cfg(target_arch = "x86_64")]
    if tile().is_some() {
        // SAFETY: the CPU has AVX-512F, BW and BF16 (tile() checked); out holds x.len() values.
        return unsafe { x86::round_to_bf16(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16::from_f32(v);
    }
}

/// `x` with every value rounded to bf16 (kept as f32): the activations [`matmul`] multiplies.
pub fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// `x · Wᵀ` for x [n, k] and W = the bf16 row blocks `blocks` stacked along the output dimension (each [m_i, k],
/// row-major), as [`crate::engine::dense::matmul_rows`] but with x rounded to bf16. Panics unless [`available`].
pub fn matmul(blocks: &[&[bf16]], x: &[f32], n: usize) -> Vec<f32> {
    let tile = tile().expect("gemm_bf16::matmul needs AVX512-BF16");
    let k = x.len() / n.max(1);
    let (chunks, m) = row_chunks(blocks, k);
    let mut xb = crate::alloc::filled_vec(x.len());
    round_to_bf16(x, &mut xb);
    let mut y = crate::alloc::filled_vec(n * m);
    let out = SyncPtr(y.as_mut_ptr());
    let row_block = (BLOCK_BYTES / (2 * k.max(1)) / X).max(1) * X;
    let job = |c: usize| {
        let (b, r0, r1, c0) = chunks[c];
        let w = blocks[b];
        for a0 in (0..n).step_by(row_block) {
            let a1 = (a0 + row_block).min(n);
            for r in (r0..r1).step_by(4) {
                // A short last group repeats its last row; only its own outputs are stored.
                let g = (r1 - r).min(4);
                let wr: [&[bf16]; 4] = std::array::from_fn(|i| &w[(r + i.min(g - 1)) * k..][..k]);
                for a in (a0..a1).step_by(X) {
                    let h = (a1 - a).min(X);
                    let xr: [&[bf16]; X] =
                        std::array::from_fn(|j| &xb[(a + j.min(h - 1)) * k..][..k]);
                    for (j, tj) in tile(wr, xr).iter().enumerate().take(h) {
                        for (i, &v) in tj.iter().enumerate().take(g) {
                            // SAFETY: (a + j, c0 + r − r0 + i) lies inside y [n, m]; chunks own disjoint output
                            // columns, and y outlives the job.
                            unsafe { *out.get().add((a + j) * m + c0 + (r - r0) + i) = v };
                        }
                    }
                }
            }
        }
    };
    pool::run(chunks.len(), &job);
    y
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// 32 bf16 values from `p`, the lanes past `mask` zero.
    ///
    /// # Safety
    /// The CPU has AVX-512BW; `p` is readable for every lane set in `mask`.
    #[target_feature(enable = "avx512bw")]
    #[inline]
    unsafe fn load(p: *const bf16, mask: __mmask32) -> __m512bh {
        // SAFETY (caller): masked-off lanes are not read. __m512bh is 32 u16 lanes, the bits loaded.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p.cast()))
        }
    }

    /// The four horizontal sums of `v`. (Loops, not closures: a closure would not inherit the target features, and
    /// its intrinsics would become calls.)
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sums4(v: &[__m512; 4]) -> [f32; 4] {
        let mut h = [_mm256_setzero_ps(); 4];
        for (h, &z) in h.iter_mut().zip(v) {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
            *h = _mm256_add_ps(_mm512_castps512_ps256(z), hi);
        }
        // hadd(hadd(a, b), hadd(c, d)) holds, per 128-bit lane, the partial sums [a, b, c, d].
        let z = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps::<1>(z));
        let mut out = [0f32; 4];
        // SAFETY: out holds 4 f32.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// `out[i] = x[i]` rounded to bf16 (to nearest even, as `bf16::from_f32`; denormals flush to zero), 32 values
    /// per instruction.
    ///
    /// # Safety
    /// The CPU has AVX-512F and BF16; `out` holds `x.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_to_bf16(x: &[f32], out: &mut [bf16]) {
        let mut xs = x.chunks_exact(32);
        let mut os = out.chunks_exact_mut(32);
        for (x, o) in xs.by_ref().zip(os.by_ref()) {
            // SAFETY: x holds 32 f32, o 32 bf16 (64 bytes); cvtne2ps puts its first operand in the upper half.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr());
                let hi = _mm512_loadu_ps(x.as_ptr().add(16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(o.as_mut_ptr().cast(), v);
            }
        }
        for (o, &v) in os.into_remainder().iter_mut().zip(xs.remainder()) {
            *o = bf16::from_f32(v);
        }
    }

    /// One step of [`tile`]: the 32 values from `i` (the lanes past `mask` zero) of every row.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and BF16; every row is readable for the lanes of `mask` from `i`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn step<const X: usize>(
        acc: &mut [[__m512; 4]; X],
        w: &[&[bf16]; 4],
        x: &[&[bf16]; X],
        i: usize,
        mask: __mmask32,
    ) {
        // SAFETY (caller): every row is readable for the lanes of mask from i.
        unsafe {
            for r in w {
                // The same offset of the next group of four rows (consecutive in the matrix): 576-wide rows end
                // before the hardware prefetcher learns their streams (as in `engine::dense`). A hint never
                // faults; past the matrix's end it only wastes a fetch.
                _mm_prefetch(
                    r.as_ptr().wrapping_add(i + 4 * r.len()).cast::<i8>(),
                    _MM_HINT_T0,
                );
            }
            let mut wv = [load(w[0].as_ptr().add(i), mask); 4];
            for r in 1..4 {
                wv[r] = load(w[r].as_ptr().add(i), mask);
            }
            for (j, row) in x.iter().enumerate() {
                let xv = load(row.as_ptr().add(i), mask);
                for r in 0..4 {
                    acc[j][r] = _mm512_dpbf16_ps(acc[j][r], xv, wv[r]);
                }
            }
        }
    }

    /// `[[x_j · w_i for i in 0..4] for j in 0..X]`: 4·X dot products of bf16 rows, 32 values per step (one
    /// `vdpbf16ps` per pair of rows: each loaded weight vector serves X activation rows, each activation vector
    /// four weight rows), the tail masked.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and BF16; every row of `w` and `x` holds `x[0].len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile<const X: usize>(w: [&[bf16]; 4], x: [&[bf16]; X]) -> [[f32; 4]; X] {
        let k = x[0].len();
        let mut acc = [[_mm512_setzero_ps(); 4]; X];
        let mut i = 0;
        while i + 32 <= k {
            // SAFETY (caller): 32 values from i in every row.
            unsafe { step(&mut acc, &w, &x, i, !0) };
            i += 32;
        }
        if i < k {
            // SAFETY (caller): the mask covers the k − i values left.
            unsafe { step(&mut acc, &w, &x, i, (1u32 << (k - i)) - 1) };
        }
        let mut out = [[0f32; 4]; X];
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = sums4(a);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding equals `half`'s (round to nearest even) on normal values, tails included.
    #[test]
    fn rounding_matches_half() {
        let x: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.731).sin() * 10f32.powi(i % 7 - 3))
            .collect();
        let mut got = vec![bf16::ZERO; x.len()];
        round_to_bf16(&x, &mut got);
        for (g, &v) in got.iter().zip(&x) {
            assert_eq!(g.to_bits(), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(rounded(&x).iter().zip(&got).all(|(a, b)| *a == b.to_f32()));
    }

    /// Against the f64 product of the bf16-rounded activations and weights (the products are exact in f32, so only
    /// the f32 summation differs), with W whole and split into stacked blocks, at shapes with row, column and
    /// k tails (k not a multiple of 32) and more rows than a cache block.
    #[test]
    fn matches_the_product_of_rounded_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (m, k, n) in [
            (1usize, 3usize, 1usize),
            (37, 70, 5),
            (130, 576, 70),
            (8, 17, 131),
        ] {
            let w: Vec<bf16> = (0..m * k)
                .map(|i| bf16::from_f32(((i * 7 % 13) as f32 - 6.0) / 5.0))
                .collect();
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0 + 1e-3 * (i % 3) as f32)
                .collect();
            let y = matmul(&[&w[..]], &x, n);
            let split = (m / 2).next_multiple_of(4).min(m);
            let (top, bottom) = w.split_at(split * k);
            assert_eq!(matmul(&[top, bottom], &x, n), y);
            for a in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k)
                        .map(|t| {
                            f64::from(bf16::from_f32(x[a * k + t]).to_f32())
                                * f64::from(w[j * k + t].to_f32())
                        })
                        .sum();
                    assert!((f64::from(y[a * m + j]) - want).abs() < 1e-3, "{m} {k} {n}");
                }
            }
        }
    }
}
