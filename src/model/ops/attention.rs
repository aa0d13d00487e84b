//! Memory-efficient attention: softmax(q kᵀ · scale + mask) v without keeping the scores for the backward pass.
//!
//! The composed attention keeps the scores, their scaled and masked copies and the softmax intermediates — several
//! `[B, H, n, m]` tensors per layer — alive until the backward pass. Here the forward pass runs one sequence of the
//! batch at a time on detached inputs, so only one sequence's scores exist at once, and keeps nothing but the
//! output; the backward pass recomputes that sequence's probabilities and forms the gradients from them (the
//! recomputation of memory-efficient / flash attention, at the granularity of a sequence: on CPU a sequence's
//! `[H, n, m]` scores are small while the whole batch's, for every layer, are not).
//!
//! Any additive mask works: the model's masks (plain causal over a packed subset whose padding follows its real
//! tokens, and the position masks of recursive KV sharing, where a subset's queries read another recursion's
//! full-sequence keys at their original positions; `crate::model::layers::position_mask`) are passed as is. Every
//! row must see at least one key, as those masks guarantee.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use crate::error::{MorError, Result};

/// softmax(q kᵀ · scale + mask) v for grouped-query attention.
///
/// `q` is `[B, n_kv, rep·n, hd]` (the `rep` query heads that share key head `g` stacked along the rows of group
/// `g`, as `crate::model::layers::Attention` lays them out), `k` and `v` are `[B, n_kv, m, hd]` and `mask` is an
/// additive `[B or 1, 1, n, m]` mask over the `n_kv·rep` query heads. Returns `[B, n_kv, rep·n, hd]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, kv, rn, hd) = q.dims4()?;
    let (bk, kvk, m, hdk) = k.dims4()?;
    let (mb, _, n, mm) = mask.dims4()?;
    if bk != b
        || kvk != kv
        || hdk != hd
        || v.dims() != k.dims()
        || mm != m
        || rn % n != 0
        || (mb != 1 && mb != b)
    {
        return Err(MorError::Config(format!(
            "attention: q {:?}, k {:?}, v {:?}, mask {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        )));
    }
    let dtype = q.dtype();
    let (q, k, v, mask) = (
        &super::kernel_input(q)?,
        &super::kernel_input(k)?,
        &super::kernel_input(v)?,
        &super::kernel_input(mask)?,
    );
    let op = Attention {
        mask: mask.detach(),
        scale,
        heads: kv * (rn / n),
        out: Mutex::new(None),
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let rows = (0..b)
        .map(|i| {
            let p = op.probs(&qd, &kd, i)?;
            p.matmul(&vd.narrow(0, i, 1)?)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    *op.out
        .lock()
        .map_err(|_| MorError::Config("attention: poisoned lock".into()))? =
        Some(Tensor::cat(&rows, 0)?);
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?
        .to_dtype(dtype)?)
}

struct Attention {
    mask: Tensor,
    scale: f64,
    heads: usize,
    /// The output, computed on the detached inputs before the graph node is made; `cpu_fwd` hands it over.
    out: Mutex<Option<Tensor>>,
}

impl Attention {
    /// Probabilities of sequence `i`: `[1, n_kv, rep·n, m]`.
    fn probs(&self, q: &Tensor, k: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (_, kv, rn, _) = q.dims4()?;
        let (mb, _, n, m) = self.mask.dims4()?;
        let mask = self.mask.narrow(0, if mb == 1 { 0 } else { i }, 1)?;
        let s = (q.narrow(0, i, 1)?.matmul(&k.narrow(0, i, 1)?.t()?)? * self.scale)?
            .reshape((1, self.heads, n, m))?
            .broadcast_add(&mask)?;
        // No gradient flows through here, so candle's fused softmax is fine (and fast).
        candle_nn::ops::softmax_last_dim(&s)?.reshape((1, kv, rn, m))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "mor-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .take();
        match out {
            Some(t) => super::storage_of(&t),
            None => candle_core::bail!("mor-attention: forward run twice"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached, so the gradients computed here do not drag a graph (and its intermediates) along.
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), out.detach());
        let grad = grad.contiguous()?;
        let b = q.dim(0)?;
        let (mut dq, mut dk, mut dv) = (
            Vec::with_capacity(b),
            Vec::with_capacity(b),
            Vec::with_capacity(b),
        );
        for i in 0..b {
            let p = self.probs(&q, &k, i)?;
            let g = grad.narrow(0, i, 1)?;
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            dv.push(p.t()?.matmul(&g)?);
            let dp = g.matmul(&vi.t()?)?;
            // dS = P ⊙ (dP − rowsum(dO ⊙ O)), the softmax backward with rowsum(P ⊙ dP) = rowsum(dO ⊙ O).
            let row = (&g * out.narrow(0, i, 1)?)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&row)?)? * self.scale)?;
            dq.push(ds.matmul(&ki)?);
            dk.push(ds.t()?.matmul(&qi)?);
        }
        Ok((
            Some(Tensor::cat(&dq, 0)?),
            Some(Tensor::cat(&dk, 0)?),
            Some(Tensor::cat(&dv, 0)?),
        ))
    }
}
