//! Activation checkpointing of one decoder layer: the forward pass keeps only the layer's input and output; the
//! backward pass runs the layer again, with its graph, and differentiates that.
//!
//! candle keeps every tensor of the autograd graph alive until the loss is dropped, so a layer costs tens of
//! activations per token (docs/benchmarks.md, "Training at the 135M shape"). A checkpointed layer is one graph node
//! instead: its forward pass runs the layer and drops the intermediates, its backward pass recomputes them (one
//! layer at a time, so one layer's activations exist at once) for one more forward pass of compute. MoR re-applies
//! the shared block per recursion step, and each application is checkpointed layer by layer.
//!
//! A `CustomOp` returns gradients for its tensor arguments only, so the gradients of the layer's weights go to a
//! [`GradSink`] that the caller merges into the gradients of the outer backward pass
//! (`crate::model::TrainOutput::backward`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, TensorId, Var};

use crate::error::{MorError, Result};
use crate::model::layers::{DecoderLayer, KeyValue, KvSource};

/// Weight gradients of checkpointed layers, accumulated over their backward passes.
#[derive(Debug, Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    fn add(&self, id: TensorId, g: &Tensor) -> candle_core::Result<()> {
        let mut map = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g.clone(),
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Add the collected weight gradients to `grads` (and empty the sink).
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let map = std::mem::take(
            &mut *self
                .grads
                .lock()
                .map_err(|_| MorError::Config("checkpoint gradients: poisoned lock".into()))?,
        );
        for (id, g) in map {
            let sum = match grads.get_id(id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }
}

/// `layer.forward(x, cos, sin, mask, kv)` checkpointed: returns the layer's output, whose backward pass recomputes
/// the layer. With `KvSource::Shared`, gradients reach the shared keys and values as well.
pub fn checkpointed_layer(
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
    kv: KvSource,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let shared = match kv {
        KvSource::Own => None,
        KvSource::Shared(kv) => Some(kv.clone()),
    };
    let op = Checkpoint {
        layer: layer.clone(),
        cos: cos.detach(),
        sin: sin.detach(),
        mask: mask.detach(),
        sink: Arc::clone(sink),
        out: Mutex::new(None),
    };
    // The forward pass builds the layer's graph on the weights and drops it with `y`: only the output stays.
    let y = op.run(
        &x.detach(),
        shared.as_ref().map(|kv| (kv.k.detach(), kv.v.detach())),
    )?;
    *op.out
        .lock()
        .map_err(|_| MorError::Config("checkpoint: poisoned lock".into()))? = Some(y.detach());
    let x = x.contiguous()?;
    Ok(match shared {
        None => x.apply_op1(op)?,
        Some(kv) => x.apply_op3(&kv.k.contiguous()?, &kv.v.contiguous()?, op)?,
    })
}

struct Checkpoint {
    layer: DecoderLayer,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    sink: Arc<GradSink>,
    /// The output, computed before the graph node is made; `cpu_fwd` hands it over.
    out: Mutex<Option<Tensor>>,
}

impl Checkpoint {
    fn run(&self, x: &Tensor, kv: Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (out, _) = match kv {
            None => self
                .layer
                .forward(x, &self.cos, &self.sin, &self.mask, KvSource::Own)?,
            Some((k, v)) => {
                let kv = KeyValue { k, v };
                self.layer
                    .forward(x, &self.cos, &self.sin, &self.mask, KvSource::Shared(&kv))?
            }
        };
        Ok(out)
    }

    fn take_out(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .take();
        match out {
            Some(t) => super::storage_of(&t),
            None => candle_core::bail!("mor-checkpoint: forward run twice"),
        }
    }

    /// Recompute the layer with a graph and differentiate ⟨out, grad⟩: gradients of the inputs; the weights'
    /// go to the sink.
    fn backward(&self, inputs: &[&Tensor], grad: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.detach()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let kv =
            (vars.len() == 3).then(|| (vars[1].as_tensor().clone(), vars[2].as_tensor().clone()));
        let out = self
            .run(vars[0].as_tensor(), kv)
            .map_err(|e| candle_core::Error::Msg(format!("mor-checkpoint recompute: {e}")))?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        for w in self.layer.weights() {
            if let Some(g) = grads.get(w) {
                self.sink.add(w.id(), g)?;
            }
        }
        vars.iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect()
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "mor-checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.take_out()
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.backward(&[x], grad)?.pop())
    }
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "mor-checkpoint-shared-kv"
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
        self.take_out()
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(&[x, k, v], grad)?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}
