//! Token-choice routing (paper §2.2.1, Eq. 2.2; official `token_choice_router.py`).
//!
//! A router reads H¹ (the output of the first unique layer) once and sends each token to one expert i, i.e. i+1
//! recursions. Recursion r runs the tokens with i ≥ r; a continuing token feeds the un-gated block output forward
//! (official code; Eq. 2.2 gates every step, docs/architecture.md S4) and a finishing token ends as H¹ + g·Block_r(…).

use candle_core::{DType, Tensor, D};

use crate::config::{Balancing, ModelConfig, TokenChoiceConfig, TokenRouterFunc};
use crate::error::Result;
use crate::model::expert_choice::RouterLosses;
use crate::model::layers::softmax_last;
use crate::model::params::{Init, ParamStore};
use crate::model::recursion::Subset;
use crate::model::router::Router;
use crate::model::routing;

/// Parameter name of the loss-free balancing bias (a buffer: updated by the trainer, never by gradients).
pub const BIAS_NAME: &str = "model.router_bias";

/// What the token-choice router decided for a batch.
#[derive(Debug, Clone)]
pub struct TokenTrace {
    /// Raw router logits [B·T, N_r].
    pub logits: Tensor,
    /// α-scaled probabilities [B·T, N_r] (no bias).
    pub probs: Tensor,
    /// Chosen expert per token (0-based; expert i runs i+1 recursions), flat [B·T].
    pub expert: Vec<u32>,
    /// Gate (unbiased probability of the chosen expert) [B·T].
    pub gate: Tensor,
    /// Tokens per expert.
    pub counts: Vec<usize>,
}

/// The routing decision of [`TokenChoice::route`] for a set of rows.
#[derive(Debug, Clone)]
pub struct TokenRoute {
    /// Raw router logits [N, N_r].
    pub logits: Tensor,
    /// α-scaled probabilities [N, N_r] (no bias).
    pub probs: Tensor,
    /// Chosen expert per row (0-based; expert i runs i+1 recursions).
    pub expert: Vec<u32>,
    /// Gate of each row: the unbiased probability of its expert [N].
    pub gate: Tensor,
}

/// The result of [`TokenChoice::forward`].
#[derive(Debug, Clone)]
pub struct TokenForward {
    /// H¹ plus each token's gated output of its last recursion, [B·T, d].
    pub x: Tensor,
    /// What the router decided.
    pub trace: TokenTrace,
    /// The auxiliary losses.
    pub losses: RouterLosses,
}

/// The token-choice router and its balancing state.
#[derive(Debug, Clone)]
pub struct TokenChoice {
    router: Router,
    /// Loss-free balancing bias (only with `balancing: loss_free`, as in the official checkpoints).
    bias: Option<Tensor>,
    cfg: TokenChoiceConfig,
    n_r: usize,
    temp: f64,
    z_loss: bool,
}

impl TokenChoice {
    /// Load or create the router (`model.router`) and the balancing bias (`model.router_bias`, zeros).
    pub fn new(store: &mut ParamStore, cfg: &ModelConfig, tc: &TokenChoiceConfig) -> Result<Self> {
        let n_r = cfg.num_recursion();
        let mor = cfg.mor.as_ref();
        Ok(TokenChoice {
            router: Router::new(store, "model.router", cfg, n_r)?,
            bias: match tc.balancing {
                Balancing::LossFree => Some(store.get_or_init(BIAS_NAME, &[n_r], Init::Zeros)?),
                _ => None,
            },
            cfg: tc.clone(),
            n_r,
            temp: mor.map_or(1.0, |m| m.temp),
            z_loss: mor.is_some_and(|m| m.z_loss),
        })
    }

    /// The routing decision for the rows of H¹ (`x`, [N, d]): raw logits [N, N_r], α-scaled probabilities, the chosen
    /// expert per row (argmax of probabilities plus the loss-free bias) and its gate (the unbiased probability).
    /// Each row is decided from itself alone, so this is causal; the KV-cached engine calls it per new token.
    pub fn route(&self, x: &Tensor, step: Option<usize>) -> Result<TokenRoute> {
        let n = x.dim(0)?;
        let logits = self.router.forward(&(x / self.temp)?)?;
        let probs = (match self.cfg.router_func {
            TokenRouterFunc::Softmax => softmax_last(&logits)?,
            TokenRouterFunc::Sigmoid => candle_nn::ops::sigmoid(&logits)?,
        } * self.cfg.alpha)?;
        let warming = step.is_some_and(|s| s < self.cfg.bal_warmup_step);
        let expert: Vec<u32> = if warming {
            vec![self.n_r as u32 - 1; n]
        } else {
            let scores = match &self.bias {
                Some(bias) => probs.broadcast_add(bias)?,
                None => probs.clone(),
            };
            scores.argmax(D::Minus1)?.to_vec1()?
        };
        let expert_t = Tensor::from_vec(expert.clone(), (n, 1), x.device())?;
        let gate = probs.gather(&expert_t, 1)?.squeeze(1)?;
        Ok(TokenRoute {
            logits,
            probs,
            expert,
            gate,
        })
    }

    /// Route H¹ (`x`, [B·T, d] flat) through the recursions; `block(r, x, subset)` runs recursion r's layers.
    /// `step` is the training step (for the balancing warm-up), `None` outside training.
    pub fn forward(
        &self,
        x: Tensor,
        b: usize,
        t: usize,
        step: Option<usize>,
        block: &mut dyn FnMut(usize, &Tensor, &Subset) -> Result<Tensor>,
    ) -> Result<TokenForward> {
        let dev = x.device().clone();
        let TokenRoute {
            logits,
            probs,
            expert,
            gate,
        } = self.route(&x, step)?;
        let mut counts = vec![0usize; self.n_r];
        for &e in &expert {
            counts[e as usize] += 1;
        }

        let h1 = x.clone();
        let mut cur = x;
        let mut out = h1.clone();
        let mut active = Subset::full(b, t);
        for r in 0..self.n_r {
            if active.count() == 0 {
                break;
            }
            let y = block(r, &cur, &active)?;
            let flat: Vec<usize> = active.flat().iter().map(|&f| f as usize).collect();
            let (fin_local, cont_local) = routing::token_choice_exits(&expert, &flat, r);
            if !fin_local.is_empty() {
                let fin_global: Vec<usize> = fin_local.iter().map(|&i| flat[i]).collect();
                let fin_global = index_tensor(&fin_global, &dev)?;
                let y_fin = y.index_select(&index_tensor(&fin_local, &dev)?, 0)?;
                let gates = gate.index_select(&fin_global, 0)?;
                out = out.index_add(
                    &fin_global,
                    &routing::apply_gate(self.cfg.gating, y_fin, &gates)?,
                    0,
                )?;
            }
            if r + 1 < self.n_r && !cont_local.is_empty() {
                // Continuing tokens carry the un-gated block output: overwrite their rows of `cur`.
                let idx = index_tensor(&flat, &dev)?;
                cur = cur.index_add(&idx, &(y - cur.index_select(&idx, 0)?)?, 0)?;
            }
            let mut continuing = vec![false; flat.len()];
            for &i in &cont_local {
                continuing[i] = true;
            }
            active = active.filter(&continuing);
        }

        let mut losses = RouterLosses::default();
        let n_tok = (b * t) as f64;
        if self.cfg.balancing == Balancing::Loss {
            // L_bal = Σ_i f_i P_i, f_i = N_r/T Σ 1[t→i], P_i = mean prob (paper App. A.2, on α-scaled probs).
            let p_mean = probs.mean(0)?;
            let f: Vec<f32> = counts
                .iter()
                .map(|&c| (self.n_r as f64 * c as f64 / n_tok) as f32)
                .collect();
            let f = Tensor::from_vec(f, self.n_r, &dev)?.to_dtype(probs.dtype())?;
            losses.balancing = Some((p_mean * f)?.sum_all()?);
        }
        if self.z_loss {
            let max = logits.max_keepdim(D::Minus1)?.detach();
            let lse = (logits
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + &max)?;
            losses.z = Some(lse.sqr()?.mean_all()?);
        }
        let trace = TokenTrace {
            logits,
            probs,
            expert,
            gate,
            counts,
        };
        Ok(TokenForward {
            x: out,
            trace,
            losses,
        })
    }

    /// Loss-free balancing update after an optimizer step (Wang et al. 2024; official trainer):
    /// ratio_i = count_i / tokens, b_i += u·sign(mean(ratio) − ratio_i). Returns the new bias (`None` without
    /// loss-free balancing). `step` is the optimizer step just taken: during the balancing warm-up the bias stays
    /// at zero (official `bal_warmup_step`).
    pub fn updated_bias(&self, counts: &[usize], step: usize) -> Result<Option<Tensor>> {
        let Some(bias) = &self.bias else {
            return Ok(None);
        };
        if step < self.cfg.bal_warmup_step {
            return Ok(Some(bias.zeros_like()?));
        }
        let total: usize = counts.iter().sum::<usize>().max(1);
        let ratio: Vec<f64> = counts.iter().map(|&c| c as f64 / total as f64).collect();
        let mean = ratio.iter().sum::<f64>() / ratio.len() as f64;
        let old: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
        let new: Vec<f32> = old
            .iter()
            .zip(&ratio)
            .map(|(&b, &r)| {
                let e = mean - r;
                let s = if e > 0.0 {
                    1.0
                } else if e < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                // In f32, as torch updates the f32 buffer.
                b + self.cfg.u as f32 * s as f32
            })
            .collect();
        Ok(Some(Tensor::from_vec(new, self.n_r, bias.device())?))
    }

    /// Settings.
    pub fn config(&self) -> &TokenChoiceConfig {
        &self.cfg
    }
}

/// Row indices as a u32 index tensor.
fn index_tensor(idx: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, idx.len(), dev)?)
}
