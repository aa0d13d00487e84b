//! Dense matmuls of a few rows (decode steps): `y = x · Wᵀ` with W [out, in] row-major as stored (f32 or bf16), on
//! the engine's [`pool`](crate::engine::pool). At batch 1 a matmul reads every weight once, so its speed is the
//! memory bandwidth: each chunk streams its weight rows once, four at a time, and reuses each loaded activation
//! vector for four rows. bf16 weights halve the bytes read; they are widened to f32 in registers (exact), so the
//! activations and accumulation stay f32. FMA on 512-bit vectors with AVX-512, 256-bit with AVX2, portable code
//! elsewhere, chosen at run time. Larger batches are GEMMs ([`crate::engine::gemm_bf16`] for bf16 weights on
//! AVX512-BF16, [`crate::engine::gemm_f32`] otherwise).

use half::bf16;

use crate::engine::pool;

/// Batches up to this many rows of f32 weights use [`matmul_rows`]; more go to a GEMM ([`crate::engine::gemm_f32`];
/// at 16 rows these kernels decoded SmolLM2 twice as fast as candle's GEMM; docs/benchmarks.md).
pub const MAX_ROWS: usize = 32;
/// The same for bf16 weights, which the f32 GEMM can use only after widening each block of rows (a pass over
/// it per call, about 1/n of the GEMM's time for n rows).
pub const MAX_ROWS_BF16: usize = 64;

/// Four dot products of weight rows with one f32 vector.
type Dot4<T> = fn([&[T]; 4], &[f32]) -> [f32; 4];

/// Four dot products of weight rows with each of two f32 vectors: `[row · x0 for the 4 rows], [row · x1 …]`.
/// Each loaded (and, for bf16, widened) weight vector serves two activation rows, halving the loads (and the
/// widenings) per FMA, which bound the one-vector kernel at batch 16 (docs/benchmarks.md).
type Dot4x2<T> = fn([&[T]; 4], &[f32], &[f32]) -> [[f32; 4]; 2];

/// A weight element type with its best [`Dot4`] kernel for this CPU.
pub trait Elem: Copy + Sync + 'static {
    /// The kernel for the CPU this runs on (detected at run time).
    fn dot4() -> Dot4<Self>;
    /// The two-vector kernel for pairs of activation rows (AVX-512 or AVX2; measured faster than the one-vector
    /// kernel on both at batch 16, docs/benchmarks.md), else `None`.
    fn dot4x2() -> Option<Dot4x2<Self>>;
}

/// Whether the CPU can run the AVX2 kernels (AVX2 and FMA); they are picked where AVX-512F is absent.
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

impl Elem for f32 {
    fn dot4() -> Dot4<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected; rows and x hold x.len() values (the wrapper's contract).
                return |r, x| unsafe { x86::dot4_f32_avx512(r, x) };
            }
            if avx2_fma() {
                // SAFETY: AVX2 and FMA were detected; rows and x hold x.len() values.
                return |r, x| unsafe { x86::dot4_f32_avx2(r, x) };
            }
        }
        |r, x| dot4_portable(r, x, |w| w)
    }

    fn dot4x2() -> Option<Dot4x2<f32>> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected; rows, x0 and x1 hold x0.len() values.
                return Some(|r, x0, x1| unsafe { x86::dot4x2_f32_avx512(r, x0, x1) });
            }
            if avx2_fma() {
                // SAFETY: AVX2 and FMA were detected; rows, x0 and x1 hold x0.len() values.
                return Some(|r, x0, x1| unsafe { x86::dot4x2_f32_avx2(r, x0, x1) });
            }
        }
        None
    }
}

impl Elem for bf16 {
    fn dot4() -> Dot4<bf16> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected; rows and x hold x.len() values.
                return |r, x| unsafe { x86::dot4_bf16_avx512(r, x) };
            }
            if avx2_fma() {
                // SAFETY: AVX2 and FMA were detected; rows and x hold x.len() values.
                return |r, x| unsafe { x86::dot4_bf16_avx2(r, x) };
            }
        }
        |r, x| dot4_portable(r, x, bf16::to_f32)
    }

    fn dot4x2() -> Option<Dot4x2<bf16>> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected; rows, x0 and x1 hold x0.len() values.
                return Some(|r, x0, x1| unsafe { x86::dot4x2_bf16_avx512(r, x0, x1) });
            }
            if avx2_fma() {
                // SAFETY: AVX2 and FMA were detected; rows, x0 and x1 hold x0.len() values.
                return Some(|r, x0, x1| unsafe { x86::dot4x2_bf16_avx2(r, x0, x1) });
            }
        }
        None
    }
}

/// An output pointer shared by the pool's chunks.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only for disjoint writes from the pool's chunks (each user documents its own at the write).
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the Sync wrapper rather than the raw field).
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `x · Wᵀ` for x [n, k] and W = the row blocks `blocks` stacked along the output dimension (each [m_i, k],
/// row-major): returns [n, Σ m_i]. Stacking without copying lets fused projections (q/k/v, gate/up) read the
/// model's own tensors.
pub fn matmul_rows<T: Elem>(blocks: &[&[T]], x: &[f32], n: usize) -> Vec<f32> {
    let k = x.len() / n.max(1);
    let (chunks, m) = row_chunks(blocks, k);
    let mut y = crate::alloc::filled_vec(n * m);
    let out = SyncPtr(y.as_mut_ptr());
    let (dot4, dot4x2) = (T::dot4(), T::dot4x2());
    let job = |c: usize| {
        let (b, r0, r1, c0) = chunks[c];
        let w = blocks[b];
        let mut r = r0;
        while r < r1 {
            let g = (r1 - r).min(4);
            let rows: [&[T]; 4] = std::array::from_fn(|i| &w[(r + i.min(g - 1)) * k..][..k]);
            let store = |a: usize, v: [f32; 4]| {
                for (i, &vi) in v.iter().take(g).enumerate() {
                    // SAFETY: (a, c0 + r − r0 + i) lies inside y [n, m]; chunks own disjoint output columns, and y
                    // outlives the job.
                    unsafe { *out.get().add(a * m + c0 + (r - r0) + i) = vi };
                }
            };
            let xa = |a: usize| &x[a * k..(a + 1) * k];
            let mut a = 0;
            if let Some(d2) = dot4x2 {
                while a + 2 <= n {
                    let [v0, v1] = d2(rows, xa(a), xa(a + 1));
                    store(a, v0);
                    store(a + 1, v1);
                    a += 2;
                }
            }
            for a in a..n {
                store(a, dot4(rows, xa(a)));
            }
            r += g;
        }
    };
    pool::run(chunks.len(), &job);
    y
}

/// The pool's chunks of a matmul over the stacked weight blocks `blocks`, each [m_i, k] (checked): whole 4-row
/// groups inside one block, ~4 chunks per thread so a descheduled worker delays only a quarter of its share. Each
/// is (block, first row, end row, first output column); also returns Σ m_i.
pub(crate) fn row_chunks<T>(
    blocks: &[&[T]],
    k: usize,
) -> (Vec<(usize, usize, usize, usize)>, usize) {
    let rows: Vec<usize> = blocks.iter().map(|b| b.len() / k.max(1)).collect();
    assert!(
        blocks.iter().zip(&rows).all(|(b, &m)| b.len() == m * k),
        "weight shape"
    );
    let m: usize = rows.iter().sum();
    let per = (m / (4 * pool::threads())).max(16).next_multiple_of(4);
    let mut chunks = Vec::new();
    let mut col = 0;
    for (b, &mb) in rows.iter().enumerate() {
        for r0 in (0..mb).step_by(per) {
            chunks.push((b, r0, (r0 + per).min(mb), col + r0));
        }
        col += mb;
    }
    (chunks, m)
}

/// [`Dot4`] in portable code (8 lanes so the compiler can vectorise), widening each weight with `f`.
fn dot4_portable<T: Copy>(rows: [&[T]; 4], x: &[f32], f: impl Fn(T) -> f32) -> [f32; 4] {
    let mut out = [0f32; 4];
    for (o, w) in out.iter_mut().zip(rows) {
        let mut acc = [0f32; 8];
        let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 = cw
            .remainder()
            .iter()
            .zip(cx.remainder())
            .map(|(&a, b)| f(a) * b)
            .sum();
        for (a, b) in cw.zip(cx) {
            for l in 0..8 {
                acc[l] += f(a[l]) * b[l];
            }
        }
        *o = acc.iter().sum::<f32>() + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The [`Dot4`](super::Dot4) kernels on x86-64 vectors. Each keeps one accumulator per row, loads the
    //! activation vector once for the four rows, and finishes the tail (k not a multiple of the width) in scalar.

    use half::bf16;
    use std::arch::x86_64::*;

    /// The scalar tail of row `w` against `x` from index `i`.
    fn tail<T: Copy>(w: &[T], x: &[f32], i: usize, f: impl Fn(T) -> f32) -> f32 {
        w[i..].iter().zip(&x[i..]).map(|(&a, b)| f(a) * b).sum()
    }

    /// Prefetch what the next group of four rows reads at offset `i`: row `r + 4` starts `4k` values after row `r`
    /// when the rows are consecutive in one matrix, as `matmul_rows` walks them. Short rows (k = 576: 1152 bytes in
    /// bf16) end before the hardware prefetcher has learnt each new row's stream; measured on AMD EPYC with
    /// AVX-512, bf16 batch-1 decode went from 71 to 128 tokens/s (docs/benchmarks.md). Past the matrix's end the
    /// hint only wastes a fetch: prefetches never fault, and the address is formed with wrapping arithmetic, never
    /// dereferenced.
    #[inline(always)]
    fn prefetch_next_group<T>(rows: &[&[T]; 4], i: usize, k: usize) {
        for row in rows {
            // SAFETY: a prefetch hint never faults and reads nothing the program observes.
            unsafe {
                _mm_prefetch(
                    row.as_ptr().wrapping_add(i + 4 * k).cast::<i8>(),
                    _MM_HINT_T0,
                )
            };
        }
    }

    /// No prefetch: the AVX2 kernels leave it to the hardware (the same hints, one per line, measured no change in
    /// f32 or bf16 batch-1 decode on an AMD EPYC with AVX2 only, 2026-12-04).
    #[inline(always)]
    fn no_prefetch<T>(_: &[&[T]; 4], _: usize, _: usize) {}

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The one-vector [`Dot4`](super::Dot4) and two-vector [`Dot4x2`](super::Dot4x2) kernels for one ISA and
    /// weight type: `$lanes` f32 lanes per vector, `$load` loading (and widening) the weights at `$p`.
    macro_rules! kernels {
        ($dot4:ident, $dot4x2:ident, $features:literal, $t:ty, $lanes:literal, $zero:path, $loadx:path,
         $fma:path, $sum:path, $prefetch:path, $widen:expr, |$p:ident| $load:expr) => {
            /// # Safety
            /// The CPU has the features enabled here; every row holds `x.len()` values.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $dot4(rows: [&[$t]; 4], x: &[f32]) -> [f32; 4] {
                let k = x.len();
                let mut acc = [$zero(); 4];
                let mut i = 0;
                while i + $lanes <= k {
                    $prefetch(&rows, i, k);
                    // SAFETY (caller): i + lanes ≤ k values in x and in every row.
                    unsafe {
                        let xv = $loadx(x.as_ptr().add(i));
                        for r in 0..4 {
                            let $p = rows[r].as_ptr().add(i);
                            acc[r] = $fma($load, xv, acc[r]);
                        }
                    }
                    i += $lanes;
                }
                std::array::from_fn(|r| $sum(acc[r]) + tail(rows[r], x, i, $widen))
            }

            /// # Safety
            /// The CPU has the features enabled here; every row and `x1` hold `x0.len()` values.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $dot4x2(
                rows: [&[$t]; 4],
                x0: &[f32],
                x1: &[f32],
            ) -> [[f32; 4]; 2] {
                let k = x0.len();
                let (mut a0, mut a1) = ([$zero(); 4], [$zero(); 4]);
                let mut i = 0;
                while i + $lanes <= k {
                    $prefetch(&rows, i, k);
                    // SAFETY (caller): i + lanes ≤ k values in x0, x1 and every row.
                    unsafe {
                        let (v0, v1) = ($loadx(x0.as_ptr().add(i)), $loadx(x1.as_ptr().add(i)));
                        for r in 0..4 {
                            let $p = rows[r].as_ptr().add(i);
                            let w = $load;
                            a0[r] = $fma(w, v0, a0[r]);
                            a1[r] = $fma(w, v1, a1[r]);
                        }
                    }
                    i += $lanes;
                }
                [
                    std::array::from_fn(|r| $sum(a0[r]) + tail(rows[r], x0, i, $widen)),
                    std::array::from_fn(|r| $sum(a1[r]) + tail(rows[r], x1, i, $widen)),
                ]
            }
        };
    }

    // bf16 is a u16 whose bits, shifted up by 16, are the f32 of the same value: the widening is exact.
    kernels!(
        dot4_f32_avx512,
        dot4x2_f32_avx512,
        "avx512f",
        f32,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps,
        prefetch_next_group,
        |w| w,
        |p| _mm512_loadu_ps(p)
    );
    kernels!(
        dot4_bf16_avx512,
        dot4x2_bf16_avx512,
        "avx512f",
        bf16,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps,
        prefetch_next_group,
        bf16::to_f32,
        |p| _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
            16
        ))
    );
    kernels!(
        dot4_f32_avx2,
        dot4x2_f32_avx2,
        "avx2,fma",
        f32,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum256,
        no_prefetch,
        |w| w,
        |p| _mm256_loadu_ps(p)
    );
    kernels!(
        dot4_bf16_avx2,
        dot4x2_bf16_avx2,
        "avx2,fma",
        bf16,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum256,
        no_prefetch,
        bf16::to_f32,
        |p| _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
            16
        ))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU can run, for f32 and bf16 weights, against an f64 product of the same (widened)
    /// weights, with W whole and split into two stacked blocks.
    #[test]
    fn matches_a_naive_product() {
        for (m, k, n) in [
            (1usize, 3usize, 1usize),
            (37, 70, 3),
            (130, 576, 8),
            (8, 17, 2),
        ] {
            let w: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let split = (m / 2).next_multiple_of(4).min(m);
            let check = |y: Vec<f32>, wf: &dyn Fn(usize) -> f64| {
                for a in 0..n {
                    for j in 0..m {
                        let want: f64 = (0..k)
                            .map(|t| f64::from(x[a * k + t]) * wf(j * k + t))
                            .sum();
                        assert!((f64::from(y[a * m + j]) - want).abs() < 1e-3, "{m} {k} {n}");
                    }
                }
            };
            let y = matmul_rows(&[&w[..]], &x, n);
            let (top, bottom) = w.split_at(split * k);
            assert_eq!(matmul_rows(&[top, bottom], &x, n), y);
            check(y, &|i| f64::from(w[i]));
            let y = matmul_rows(&[&wb[..]], &x, n);
            let (top, bottom) = wb.split_at(split * k);
            assert_eq!(matmul_rows(&[top, bottom], &x, n), y);
            check(y, &|i| f64::from(wb[i].to_f32()));
            // The portable kernels give the same products.
            let rows: [&[f32]; 4] = std::array::from_fn(|i| &w[(i % m) * k..][..k]);
            let rows_b: [&[bf16]; 4] = std::array::from_fn(|i| &wb[(i % m) * k..][..k]);
            let (fast, slow) = (
                f32::dot4()(rows, &x[..k]),
                dot4_portable(rows, &x[..k], |v| v),
            );
            let (fast_b, slow_b) = (
                bf16::dot4()(rows_b, &x[..k]),
                dot4_portable(rows_b, &x[..k], bf16::to_f32),
            );
            for i in 0..4 {
                assert!((fast[i] - slow[i]).abs() < 1e-3 && (fast_b[i] - slow_b[i]).abs() < 1e-3);
            }
            // The AVX2 kernels too where the CPU would pick AVX-512.
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: AVX2 and FMA were detected; every row holds k values, as x[..k] does.
                let (v, v_b) = unsafe {
                    (
                        x86::dot4_f32_avx2(rows, &x[..k]),
                        x86::dot4_bf16_avx2(rows_b, &x[..k]),
                    )
                };
                for i in 0..4 {
                    assert!((v[i] - slow[i]).abs() < 1e-3 && (v_b[i] - slow_b[i]).abs() < 1e-3);
                }
                // The pair kernels: the second vector is x's last row (the first when n = 1).
                let x1 = &x[(n - 1) * k..n * k];
                let slow1 = dot4_portable(rows, x1, |v| v);
                let slow1_b = dot4_portable(rows_b, x1, bf16::to_f32);
                // SAFETY: as above; x1 holds k values.
                let ([p0, p1], [q0, q1]) = unsafe {
                    (
                        x86::dot4x2_f32_avx2(rows, &x[..k], x1),
                        x86::dot4x2_bf16_avx2(rows_b, &x[..k], x1),
                    )
                };
                for i in 0..4 {
                    for (got, want) in [(p0, slow), (p1, slow1), (q0, slow_b), (q1, slow1_b)] {
                        assert!((got[i] - want[i]).abs() < 1e-3, "{m} {k} {n}");
                    }
                }
            }
        }
    }
}
