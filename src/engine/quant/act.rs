//! Activations quantized to 8 bits for the integer dot products: each row of 32-value blocks, each block with its
//! scale `d` (`x ≈ d·q`, q ∈ [−127, 127]) and `d·Σq` (the term that a weight format with an offset or a minimum
//! multiplies, so its kernels need no second pass over the block). One format serves every weight format.

use super::BLOCK;

/// Rows of activations quantized to 8 bits in blocks of [`BLOCK`].
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    /// Row width (a multiple of [`BLOCK`]).
    pub cols: usize,
    /// Quantized values, row-major [n, cols].
    pub q: Vec<i8>,
    /// Per block: the scale.
    pub d: Vec<f32>,
    /// Per block: scale × sum of the quantized values.
    pub ds: Vec<f32>,
}

/// One row of [`QuantizedRows`] as raw pointers for the kernels.
#[derive(Clone, Copy)]
pub(super) struct ActRow {
    pub q: *const i8,
    pub d: *const f32,
    pub ds: *const f32,
}

impl QuantizedRows {
    /// Quantize `x` ([n, cols] row-major; `cols` a multiple of [`BLOCK`]).
    pub fn new(x: &[f32], cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols.max(1)));
        let nb = x.len() / BLOCK;
        let mut out = QuantizedRows {
            cols,
            q: crate::alloc::filled_vec(x.len()),
            d: crate::alloc::filled_vec(nb),
            ds: crate::alloc::filled_vec(nb),
        };
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            unsafe { super::x86::quantize_rows_avx2(x, &mut out.q, &mut out.d, &mut out.ds) };
            return out;
        }
        quantize_scalar(x, &mut out.q, &mut out.d, &mut out.ds);
        out
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.q.len() / self.cols.max(1)
    }

    pub(super) fn row(&self, r: usize) -> ActRow {
        let nb = self.cols / BLOCK;
        ActRow {
            q: self.q[r * self.cols..].as_ptr(),
            d: self.d[r * nb..].as_ptr(),
            ds: self.ds[r * nb..].as_ptr(),
        }
    }
}

/// Portable quantization: round to nearest, ties to even (as the SIMD path's `_mm256_round_ps`).
pub(super) fn quantize_scalar(x: &[f32], q: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
    for (b, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in qb.iter_mut().zip(xb) {
            let r = (v * inv).round_ties_even() as i32;
            *o = r as i8;
            sum += r;
        }
        d[b] = scale;
        ds[b] = scale * sum as f32;
    }
}
