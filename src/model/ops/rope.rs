//! RoPE in the HF "rotate_half" convention, y = x ⊙ cos + rotate_half(x) ⊙ sin, as one pass.
//!
//! The composed rotation keeps −x₂, the concatenated rotation and both products (four `[B, H, n, hd]` tensors per
//! application); this one keeps nothing (the backward pass is the transposed rotation of the upstream gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dispatch, kernel_input, slice, Float};
use crate::error::{MorError, Result};

/// Rotate x `[B, H, n, hd]` by cos/sin `[B, 1, n, hd]` (as gathered by `crate::model::layers::Rope::at`). The
/// tables are constants: no gradient flows to them.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, n, hd) = x.dims4()?;
    if cos.dims() != [b, 1, n, hd] || sin.dims() != cos.dims() || hd % 2 != 0 {
        return Err(MorError::Config(format!(
            "rope: x {:?} with tables {:?} / {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )));
    }
    let dtype = x.dtype();
    let (x, cos, sin) = (kernel_input(x)?, kernel_input(cos)?, kernel_input(sin)?);
    Ok(x.contiguous()?
        .apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { transpose: false },
        )?
        .to_dtype(dtype)?)
}

/// `transpose: false` rotates (forward); `true` applies the transposed map (the backward of the forward).
struct Rope {
    transpose: bool,
}

fn rotate<T: Float>(x: &[T], cos: &[T], sin: &[T], dims: &[usize], transpose: bool) -> Vec<T> {
    let (h, n, hd) = (dims[1], dims[2], dims[3]);
    let half = hd / 2;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n * hd)
        .zip(x.par_chunks(n * hd))
        .enumerate()
        .for_each(|(bh, (yp, xp))| {
            let b = bh / h;
            for i in 0..n {
                let t = (b * n + i) * hd;
                let (c, s) = (&cos[t..t + hd], &sin[t..t + hd]);
                let (xr, yr) = (&xp[i * hd..(i + 1) * hd], &mut yp[i * hd..(i + 1) * hd]);
                for j in 0..half {
                    if transpose {
                        // dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin), rotate_halfᵀ(z) = [z₂, −z₁].
                        yr[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
                        yr[j + half] = xr[j + half] * c[j + half] - xr[j] * s[j];
                    } else {
                        yr[j] = xr[j] * c[j] - xr[j + half] * s[j];
                        yr[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
                    }
                }
            }
        });
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "mor-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Float>(
            xs: &CpuStorage,
            xl: &Layout,
            cs: &CpuStorage,
            cl: &Layout,
            ss: &CpuStorage,
            sl: &Layout,
            transpose: bool,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (x, c, s) = (
                slice::<T>(xs, xl, "rope")?,
                slice::<T>(cs, cl, "rope")?,
                slice::<T>(ss, sl, "rope")?,
            );
            let y = rotate(x, c, s, xl.dims(), transpose);
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        }
        dispatch!(xs, self.name(), run(xs, xl, cs, cl, ss, sl, self.transpose))
    }

    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(
            &cos.detach(),
            &sin.detach(),
            &Rope {
                transpose: !self.transpose,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}
