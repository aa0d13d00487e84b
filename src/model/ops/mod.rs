//! Fused training ops with their own backward pass (candle `CustomOp`s).
//!
//! candle's fused CPU kernels (`rms_norm`, `softmax_last_dim`, `rope`, sdpa) drop gradients, so the model's
//! reference path composes every op from primitives (`crate::model::layers`). A composed op keeps each intermediate
//! alive for the backward pass: at the SmolLM-135M shape the attention scores and their softmax (`[B, H, T, T]` per
//! layer) and the LM head's `[tokens, vocab]` logits dominate a training step's memory (docs/benchmarks.md). The ops
//! here keep only their inputs (and the output where the backward needs it) and recompute the rest in the backward
//! pass. Each is checked against the composed version and by f64 finite differences (`tests/fused.rs`).

pub mod attention;
pub mod checkpoint;
pub mod cross_entropy;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use attention::attention;
pub use checkpoint::{checkpointed_layer, GradSink};
pub use cross_entropy::lm_head_cross_entropy;
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor, WithDType};

/// The contiguous slice of `s` that `l` describes (every op here makes its inputs contiguous first).
fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: input is not contiguous"),
    }
}

/// A fused op's input as its kernels take it: f32 and f64 as they are, other float dtypes (bf16 models) widened
/// to f32, so such a model runs its norms, rotations and attention in f32 (as HF computes half-precision norms)
/// and casts the result back with `to_dtype` of the input's dtype.
fn kernel_input(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    }
}

/// The storage of a computed tensor, for a `cpu_fwd` that returns a value computed with tensor ops.
fn storage_of(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        dt => bail!("fused ops support f32 and f64, not {dt:?}"),
    };
    Ok((s, shape))
}

/// Elementwise float types the fused kernels run on.
trait Float: WithDType + num_traits::Float + Send + Sync {}
impl Float for f32 {}
impl Float for f64 {}

/// Dispatch a generic kernel on the dtype of storage `s`.
macro_rules! dispatch {
    ($s:expr, $op:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            candle_core::CpuStorage::F32(_) => $f::<f32>($($arg),*),
            candle_core::CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("{}: fused ops support f32 and f64", $op),
        }
    };
}
use dispatch;
