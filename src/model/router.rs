//! Router networks (official `model/mor_model/util.py`, docs/architecture.md S3): a linear map, or a
//! two-layer MLP with exact-erf GELU, both without biases.

use candle_core::Tensor;

use crate::config::{ModelConfig, RouterType};
use crate::error::Result;
use crate::model::layers::linear;
use crate::model::params::{Init, ParamStore};

/// A router producing `out` logits per token.
#[derive(Debug, Clone)]
pub enum Router {
    /// Linear(d, out).
    Linear(Tensor),
    /// Linear(d, h) → GELU → Linear(h, out).
    Mlp(Tensor, Tensor),
}

impl Router {
    /// Load or create a router under `prefix` (`{prefix}.weight`, or `{prefix}.0.weight` / `{prefix}.2.weight` for
    /// MLPs, matching the official `nn.Sequential` indices). Routers are initialised N(0, initializer_range).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: &ModelConfig,
        out: usize,
    ) -> Result<Self> {
        let mor = cfg.mor.as_ref();
        let d = cfg.hidden_size;
        let init = Init::Normal(cfg.initializer_range);
        Ok(match mor.map_or(RouterType::Linear, |m| m.router_type) {
            RouterType::Linear => {
                Router::Linear(store.get_or_init(&format!("{prefix}.weight"), &[out, d], init)?)
            }
            RouterType::Mlp | RouterType::WideMlp => {
                let h = mor.map_or(2 * d, |m| m.router_hidden_width(d));
                Router::Mlp(
                    store.get_or_init(&format!("{prefix}.0.weight"), &[h, d], init)?,
                    store.get_or_init(&format!("{prefix}.2.weight"), &[out, h], init)?,
                )
            }
        })
    }

    /// Raw logits for x [.., d] → [.., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Router::Linear(w) => linear(x, w),
            Router::Mlp(w1, w2) => linear(&linear(x, w1)?.gelu_erf()?, w2),
        }
    }
}
