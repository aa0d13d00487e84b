//! Dense f32 matmuls of a few rows (decode steps): `y = x · Wᵀ` with W [out, in] row-major as stored, on the
//! engine's [`pool`](crate::engine::pool). At batch 1 a matmul reads every weight once, so its speed is the memory
//! bandwidth: each chunk streams its weight rows once, four at a time, and reuses each loaded activation vector for
//! four rows (FMA on 256-bit vectors when the CPU has AVX2, portable code elsewhere). Larger batches are GEMMs
//! and go to candle.

use crate::engine::pool;

/// Batches up to this many rows use [`matmul_rows`]; more go to candle's GEMM (measured crossover; see
/// docs/benchmarks.md).
pub const MAX_ROWS: usize = 8;

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from the pool's chunks (see `matmul_rows`).
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the Sync wrapper rather than the raw field).
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `x · Wᵀ` for x [n, k] and W [m, k] (both row-major): returns [n, m].
pub fn matmul_rows(w: &[f32], m: usize, x: &[f32], n: usize) -> Vec<f32> {
    let k = x.len() / n.max(1);
    assert_eq!(w.len(), m * k, "weight shape");
    let mut y = crate::alloc::filled_vec(n * m);
    let out = SyncPtr(y.as_mut_ptr());
    // Chunks of whole 4-row groups, ~4 per thread so a descheduled worker delays only a quarter of its share.
    let per = (m / (4 * pool::threads())).max(16).next_multiple_of(4);
    let chunks = m.div_ceil(per);
    #[cfg(target_arch = "x86_64")]
    let simd =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    let job = |c: usize| {
        let (r0, r1) = (c * per, ((c + 1) * per).min(m));
        let mut r = r0;
        while r < r1 {
            let g = (r1 - r).min(4);
            let rows: [&[f32]; 4] = std::array::from_fn(|i| &w[(r + i.min(g - 1)) * k..][..k]);
            for a in 0..n {
                let xa = &x[a * k..(a + 1) * k];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA were detected; rows and xa hold k values each.
                let v = if simd {
                    unsafe { dot4_avx2(rows, xa) }
                } else {
                    dot4(rows, xa)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let v = dot4(rows, xa);
                for (i, &vi) in v.iter().take(g).enumerate() {
                    // SAFETY: (a, r + i) lies inside y [n, m]; chunks own disjoint rows r, and y outlives the job.
                    unsafe { *out.get().add(a * m + r + i) = vi };
                }
            }
            r += g;
        }
    };
    pool::run(chunks, &job);
    y
}

/// Four dot products with one vector, portable (8 lanes so the compiler can vectorise).
fn dot4(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    let mut out = [0f32; 4];
    for (o, w) in out.iter_mut().zip(rows) {
        let mut acc = [0f32; 8];
        let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 = cw
            .remainder()
            .iter()
            .zip(cx.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in cw.zip(cx) {
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
        *o = acc.iter().sum::<f32>() + tail;
    }
    out
}

/// [`dot4`] with AVX2 + FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; every row holds `x.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 8 <= k {
        // SAFETY (caller): i + 8 ≤ k values in x and in every row.
        unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].as_ptr().add(i)), xv, acc[r]);
            }
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        let v = acc[r];
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
            + rows[r][i..]
                .iter()
                .zip(&x[i..])
                .map(|(a, b)| a * b)
                .sum::<f32>();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product() {
        for (m, k, n) in [(1, 3, 1), (37, 70, 3), (130, 576, 8)] {
            let w: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let y = matmul_rows(&w, m, &x, n);
            for a in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k)
                        .map(|t| f64::from(x[a * k + t]) * f64::from(w[j * k + t]))
                        .sum();
                    assert!((f64::from(y[a * m + j]) - want).abs() < 1e-3, "{m} {k} {n}");
                }
            }
        }
    }
}
