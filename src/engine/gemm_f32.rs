//! f32 GEMM for prompt-sized batches, `y = x · Wᵀ`, by blocks of weight rows on the engine's
//! [`pool`](crate::engine::pool): each job writes one block of W's rows as f32 into its own L2-sized buffer (widening
//! quantized or bf16 rows, or copying f32 ones out of stacked blocks) and multiplies it with a single-threaded GEMM
//! (the `gemm` crate, as candle uses) straight into its columns of y. So the widening runs on every thread, no
//! widened copy of the whole matrix and no copy of the output ever exist, and stacked weights (q/k/v, gate/up) need
//! no concatenation.

use crate::engine::dense::SyncPtr;
use crate::engine::pool;

/// Bytes of one job's weight block: a few hundred KiB, so it stays in L2 while the activations stream past it.
const BLOCK_BYTES: usize = 256 << 10;

/// `x · Wᵀ` for x [n, k] (row-major) and W [m, k], whose rows `fill(r0, buf)` writes: rows r0.. of W, as many as
/// `buf` holds (`buf.len() / k`), row-major. Returns [n, m].
pub fn matmul(x: &[f32], n: usize, m: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let k = x.len() / n.max(1);
    assert_eq!(x.len(), n * k, "activation shape");
    let mut y = crate::alloc::filled_vec(n * m);
    if n == 0 || m == 0 || k == 0 {
        return y;
    }
    let rows = (BLOCK_BYTES / (4 * k)).clamp(16, 128) / 16 * 16;
    let out = SyncPtr(y.as_mut_ptr());
    let job = |j: usize| {
        let (r0, r1) = (j * rows, ((j + 1) * rows).min(m));
        let mut w = crate::alloc::filled_vec((r1 - r0) * k);
        fill(r0, &mut w);
        // SAFETY: the operands lie inside their slices: x is n × k (lhs, row stride k), w is (r1 − r0) × k read as
        // its transpose (rhs: column stride k, row stride 1); the destination is columns r0..r1 of y [n, m] (row
        // stride m), which only this job writes, and y outlives the pool job.
        unsafe {
            gemm::gemm(
                n,
                r1 - r0,
                k,
                out.get().add(r0),
                1,
                m as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    pool::run(m.div_ceil(rows), &job);
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_f64_product_with_blocks_and_tails() {
        // m not a multiple of the block rows, k giving several block sizes, n from 1 up.
        for (n, m, k) in [(1, 37, 64), (70, 300, 576), (5, 129, 1536), (3, 16, 7)] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104729) % 199) as f32 / 99.0 - 1.0)
                .collect();
            let y = matmul(&x, n, m, |r0, buf| {
                buf.copy_from_slice(&w[r0 * k..r0 * k + buf.len()])
            });
            for a in 0..n {
                for c in 0..m {
                    let want: f64 = (0..k)
                        .map(|t| f64::from(x[a * k + t]) * f64::from(w[c * k + t]))
                        .sum();
                    let got = f64::from(y[a * m + c]);
                    assert!(
                        (got - want).abs() <= 1e-5 * k as f64,
                        "n={n} m={m} k={k} ({a}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
