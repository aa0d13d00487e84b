//! The SwiGLU gate, silu(g) ⊙ u, as one elementwise pass; the backward pass recomputes the sigmoid.
//!
//! The composed gate keeps sigmoid(g), g · sigmoid(g) and the product (three `[tokens, ffn]` tensors per layer,
//! the widest activations of the layer); this one keeps only g and u.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dispatch, kernel_input, slice, Float};
use crate::error::{MorError, Result};

/// silu(g) ⊙ u for g and u of the same shape.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        return Err(MorError::Config(format!(
            "swiglu: gate {:?} and up {:?} differ",
            g.dims(),
            u.dims()
        )));
    }
    let (g, u, dtype) = (kernel_input(g)?, kernel_input(u)?, g.dtype());
    Ok(g.contiguous()?
        .apply_op2(&u.contiguous()?, SwiGlu)?
        .to_dtype(dtype)?)
}

struct SwiGlu;

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "mor-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            gs: &CpuStorage,
            gl: &Layout,
            us: &CpuStorage,
            ul: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (g, u) = (slice::<T>(gs, gl, "swiglu")?, slice::<T>(us, ul, "swiglu")?);
            let mut y = vec![T::zero(); g.len()];
            y.par_chunks_mut(GRAIN)
                .zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN)))
                .for_each(|(yc, (gc, uc))| {
                    for ((o, &a), &b) in yc.iter_mut().zip(gc).zip(uc) {
                        *o = a * sigmoid(a) * b;
                    }
                });
            Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
        }
        dispatch!(gs, self.name(), run(gs, gl, us, ul))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u) = (g.detach(), u.detach());
        let both = g.apply_op3_no_bwd(&u, &grad.contiguous()?, &SwiGluBackward)?;
        let n = g.elem_count();
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(g.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// dg then du, flat: `[2 · numel]`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "mor-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            gs: &CpuStorage,
            gl: &Layout,
            us: &CpuStorage,
            ul: &Layout,
            ds: &CpuStorage,
            dl: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let name = "swiglu backward";
            let (g, u, dy) = (
                slice::<T>(gs, gl, name)?,
                slice::<T>(us, ul, name)?,
                slice::<T>(ds, dl, name)?,
            );
            let n = g.len();
            let mut out = vec![T::zero(); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(GRAIN)
                .zip(du.par_chunks_mut(GRAIN))
                .zip(
                    g.par_chunks(GRAIN)
                        .zip(u.par_chunks(GRAIN).zip(dy.par_chunks(GRAIN))),
                )
                .for_each(|((dgc, duc), (gc, (uc, yc)))| {
                    for i in 0..gc.len() {
                        let (a, b, d) = (gc[i], uc[i], yc[i]);
                        let s = sigmoid(a);
                        // d silu(a)/da = σ(a) (1 + a (1 − σ(a))).
                        dgc[i] = d * b * s * (T::one() + a * (T::one() - s));
                        duc[i] = d * a * s;
                    }
                });
            Ok((T::to_cpu_storage_owned(out), Shape::from(2 * n)))
        }
        dispatch!(gs, self.name(), run(gs, gl, us, ul, ds, dl))
    }
}
