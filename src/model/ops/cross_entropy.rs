//! The LM head and next-token cross-entropy in one op that never holds the `[tokens, vocab]` logits.
//!
//! With SmolLM's 49152-token vocabulary, the logits of a batch of 8 × 512 tokens are 0.8 GB in f32, and the composed
//! log-softmax keeps several tensors of that size for the backward pass. Here the rows are processed in chunks of
//! about [`CHUNK_ELEMS`] logits: each chunk's logits give its share of the loss and, since the loss is a scalar
//! whose gradient is known up to the upstream factor, its share of ∂loss/∂h and ∂loss/∂W right away (the
//! forward-time gradient of fused linear cross-entropy kernels). The backward pass only scales those by the
//! upstream gradient, so the head costs the three matmuls of the composed version and no recomputation.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};

use crate::error::{MorError, Result};

/// Logits per chunk (128 MiB in f32): bounds the transient memory of the head.
pub const CHUNK_ELEMS: usize = 1 << 25;

/// Σ over rows of −log softmax(h Wᵀ)[row, target]: `h` `[N, d]`, `w` `[V, d]`, one target per row. Returns a
/// scalar in the dtype of `h`. Gradients flow to `h` and `w` when either tracks them.
pub fn lm_head_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let rows = (CHUNK_ELEMS / w.dim(0)?.max(1)).max(1);
    lm_head_cross_entropy_in_chunks(h, w, targets, rows)
}

/// [`lm_head_cross_entropy`] with `rows` rows per chunk (tests use small chunks to exercise the chunking).
pub fn lm_head_cross_entropy_in_chunks(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    rows: usize,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if dw != d || targets.len() != n || n == 0 {
        return Err(MorError::Config(format!(
            "lm_head_cross_entropy: h {:?}, w {:?} and {} targets do not fit together",
            h.dims(),
            w.dims(),
            targets.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(MorError::Request(format!(
            "target {t} is outside the vocabulary ({v})"
        )));
    }
    let want_grad = h.track_op() || w.track_op();
    let (hd, wd) = (h.detach(), w.detach());
    let rows = rows.clamp(1, n);
    let mut loss = 0.0f64;
    let mut grad_h = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    for start in (0..n).step_by(rows) {
        let r = rows.min(n - start);
        let hc = hd.narrow(0, start, r)?;
        let tc = Tensor::from_slice(&targets[start..start + r], (r, 1), h.device())?;
        let logits = hc.matmul(&wd.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let lse = (max + sum.log()?)?;
        let picked = logits.gather(&tc, D::Minus1)?;
        loss += (lse - picked)?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        if want_grad {
            drop(logits);
            // ∂/∂logits = softmax − one-hot(target).
            let p = e.broadcast_div(&sum)?;
            drop(e);
            let minus_one = Tensor::full(-1.0f32, (r, 1), h.device())?.to_dtype(h.dtype())?;
            let g = p.scatter_add(&tc, &minus_one, D::Minus1)?;
            grad_h.push(g.matmul(&wd)?);
            let gw = g.t()?.matmul(&hc)?;
            grad_w = Some(match grad_w {
                Some(acc) => (acc + gw)?,
                None => gw,
            });
        }
    }
    let grads = match (want_grad, grad_w) {
        (true, Some(gw)) => Some((Tensor::cat(&grad_h, 0)?, gw)),
        _ => None,
    };
    let op = CrossEntropy {
        loss,
        grads: Mutex::new(grads),
    };
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

struct CrossEntropy {
    /// The loss, computed in chunks before the graph node is made.
    loss: f64,
    /// ∂loss/∂h and ∂loss/∂W for an upstream gradient of 1, taken by the backward pass.
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "mor-lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = match h {
            CpuStorage::F32(_) => CpuStorage::F32(vec![self.loss as f32]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.loss]),
            _ => candle_core::bail!("{}: f32 and f64 only", self.name()),
        };
        Ok((s, Shape::from(())))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .take();
        let Some((gh, gw)) = grads else {
            candle_core::bail!("{}: backward run twice", self.name());
        };
        let grad = grad.detach();
        Ok((
            Some(gh.broadcast_mul(&grad)?),
            Some(gw.broadcast_mul(&grad)?),
        ))
    }
}
