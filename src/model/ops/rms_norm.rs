//! RMSNorm, y = x / sqrt(mean(x²) + ε) · w, as one pass per row; the backward pass recomputes the row's scale.
//!
//! The composed norm keeps x², x · inv and the broadcast product (three `[rows, d]` tensors per norm); this one
//! keeps only its input.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dispatch, kernel_input, slice, Float};
use crate::error::{MorError, Result};

/// RMSNorm of x `[.., d]` with weight `[d]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] {
        return Err(MorError::Config(format!(
            "rms_norm: weight {:?} for input {:?}",
            w.dims(),
            x.dims()
        )));
    }
    let (x, w, dtype) = (kernel_input(x)?, kernel_input(w)?, x.dtype());
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps })?
        .to_dtype(dtype)?)
}

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Float>(row: &[T], eps: f64) -> T {
    let ms =
        row.iter().map(|&v| v * v).fold(T::zero(), |a, b| a + b) / T::from_f64(row.len() as f64);
    T::one() / (ms + T::from_f64(eps)).sqrt()
}

fn forward<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let inv = inv_rms(xr, eps);
            for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = a * inv * g;
            }
        });
    y
}

/// dx rows followed by one row of dw: `[rows + 1, d]`.
fn backward<T: Float>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let rows = x.len() / d;
    let mut out = vec![T::zero(); x.len() + d];
    let (dx, dw) = out.split_at_mut(rows * d);
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(dxr, (xr, gr))| {
            let inv = inv_rms(xr, eps);
            // dx = inv · (g ⊙ w − x̂ · mean(g ⊙ w ⊙ x̂)), x̂ = x · inv.
            let dot = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((&a, &g), &c)| g * c * a * inv)
                .fold(T::zero(), |s, v| s + v)
                / T::from_f64(d as f64);
            for (((o, &a), &g), &c) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = inv * (g * c - a * inv * dot);
            }
        });
    for (xr, gr) in x.chunks(d).zip(dy.chunks(d)) {
        let inv = inv_rms(xr, eps);
        for ((o, &a), &g) in dw.iter_mut().zip(xr).zip(gr) {
            *o += g * a * inv;
        }
    }
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "mor-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            xs: &CpuStorage,
            xl: &Layout,
            ws: &CpuStorage,
            wl: &Layout,
            eps: f64,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let y = forward::<T>(slice(xs, xl, "rms_norm")?, slice(ws, wl, "rms_norm")?, eps);
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        }
        dispatch!(xs, self.name(), run(xs, xl, ws, wl, self.eps))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        let both =
            x.apply_op3_no_bwd(&w, &grad.contiguous()?, &RmsNormBackward { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBackward {
    eps: f64,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "mor-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Float>(
            xs: &CpuStorage,
            xl: &Layout,
            ws: &CpuStorage,
            wl: &Layout,
            gs: &CpuStorage,
            gl: &Layout,
            eps: f64,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let name = "rms_norm backward";
            let (x, w, g) = (
                slice::<T>(xs, xl, name)?,
                slice::<T>(ws, wl, name)?,
                slice::<T>(gs, gl, name)?,
            );
            let d = w.len();
            let out = backward(x, w, g, eps);
            Ok((
                T::to_cpu_storage_owned(out),
                Shape::from((x.len() / d + 1, d)),
            ))
        }
        dispatch!(xs, self.name(), run(xs, xl, ws, wl, gs, gl, self.eps))
    }
}
