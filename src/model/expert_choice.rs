//! Expert-choice routing (paper §2.2.1, Eq. 2.1; official `expert_choice_router.py`).
//!
//! At recursion r a router scores the tokens that survived recursion r−1 (hierarchical filtering), keeps the top-k
//! of each sequence (or, causally, those above a threshold), runs the shared block on them and adds the gated block
//! output: H ← H + g·Block(H). `Block(H)` already contains the residual, so a selected token becomes
//! (1+g)·H + g·Δ (docs/architecture.md S3).

use candle_core::{DType, Tensor};

use crate::config::{DecodeRule, ExpertChoiceConfig, ExpertRouterFunc, ModelConfig, Sampling};
use crate::error::Result;
use crate::model::capacity::{top_k, warmed_capacity};
use crate::model::params::ParamStore;
use crate::model::recursion::Subset;
use crate::model::router::Router;
use crate::model::routing;

/// How tokens are chosen at each recursion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    /// Per-sequence top-k over the whole sequence (training and the paper's evaluation; not causal). `step` is the
    /// training step, for the capacity warm-up.
    TopK {
        /// Training step, if training.
        step: Option<usize>,
    },
    /// The causal decode rule of the config (docs/architecture.md S5): each token decides from its own router output only.
    Causal,
}

/// What one recursion step decided.
#[derive(Debug, Clone)]
pub struct ExpertStep {
    /// Tokens eligible at this step.
    pub candidates: Subset,
    /// Raw router logits of the candidates, in the candidates' flat order `[N_cand]`.
    pub logits: Tensor,
    /// α·G(logit) of the candidates `[N_cand]`.
    pub probs: Tensor,
    /// Tokens chosen.
    pub selected: Subset,
    /// For each candidate, whether it was chosen.
    pub chosen: Vec<bool>,
    /// Gate applied to each chosen token `[N_sel]`.
    pub gates: Tensor,
}

/// The causal decision of one recursion ([`ExpertChoice::causal_decision`]).
#[derive(Debug, Clone)]
pub struct CausalDecision {
    /// For each candidate, whether it goes on to this recursion.
    pub chosen: Vec<bool>,
    /// σ(decode-rule logit) of each candidate: what the threshold was compared with.
    pub probs: Vec<f32>,
}

/// The result of [`ExpertChoice::forward`].
#[derive(Debug, Clone)]
pub struct ExpertForward {
    /// The residual stream after the last recursion, [B·T, d].
    pub x: Tensor,
    /// What each recursion decided.
    pub steps: Vec<ExpertStep>,
    /// The auxiliary losses.
    pub losses: RouterLosses,
    /// The residual stream after each recursion.
    pub outputs: Vec<Tensor>,
}

/// The auxiliary losses and metrics of one forward.
#[derive(Debug, Clone, Default)]
pub struct RouterLosses {
    /// Σ_r BCE(main router logits, top-k targets) (official `sampling_loss`).
    pub sampling: Option<Tensor>,
    /// Σ_r BCE of the auxiliary router on detached inputs.
    pub aux_router: Option<Tensor>,
    /// Router z-loss.
    pub z: Option<Tensor>,
    /// Token-choice balancing loss Σ f_i P_i.
    pub balancing: Option<Tensor>,
}

/// Expert-choice routers, one per recursion (routers are not shared across recursions).
#[derive(Debug, Clone)]
pub struct ExpertChoice {
    routers: Vec<Router>,
    aux_routers: Vec<Router>,
    cfg: ExpertChoiceConfig,
    capacities: Vec<f64>,
    temp: f64,
    z_loss: bool,
}

/// BCE with logits, summed: max(x,0) − x·y + log(1 + e^{−|x|}).
pub fn bce_with_logits_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let soft = ((logits.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((logits.relu()? - (logits * targets)?)?
        .add(&soft)?
        .sum_all()?)
}

impl ExpertChoice {
    /// Load or create the routers (`model.routers.{r}`, and `model.aux_routers.{r}` with `sampling: aux_router`).
    pub fn new(store: &mut ParamStore, cfg: &ModelConfig, ec: &ExpertChoiceConfig) -> Result<Self> {
        let n = cfg.num_recursion();
        let routers = (0..n)
            .map(|r| Router::new(store, &format!("model.routers.{r}"), cfg, 1))
            .collect::<Result<Vec<_>>>()?;
        let aux_routers = if ec.sampling == Sampling::AuxRouter {
            (0..n)
                .map(|r| Router::new(store, &format!("model.aux_routers.{r}"), cfg, 1))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let mor = cfg.mor.as_ref();
        Ok(ExpertChoice {
            routers,
            aux_routers,
            cfg: ec.clone(),
            capacities: cfg.capacities(),
            temp: mor.map_or(1.0, |m| m.temp),
            z_loss: mor.is_some_and(|m| m.z_loss),
        })
    }

    /// Settings.
    pub fn config(&self) -> &ExpertChoiceConfig {
        &self.cfg
    }

    /// The router function G applied to raw logits (paper Eq. 2.1).
    pub fn activate(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.router_func {
            ExpertRouterFunc::Sigmoid => candle_nn::ops::sigmoid(logits)?,
            ExpertRouterFunc::Tanh => logits.tanh()?,
            ExpertRouterFunc::None => logits.clone(),
        })
    }

    /// Capacity of recursion r at training step `step`.
    pub fn capacity(&self, r: usize, step: Option<usize>) -> f64 {
        let c = self.capacities[r];
        match step {
            Some(s) => warmed_capacity(c, s, self.cfg.cap_warmup_step),
            None => c,
        }
    }

    /// Router logits `[N]` of the rows `x` ([N, d]) for recursion r (`aux` selects the auxiliary router).
    pub fn logits(&self, r: usize, x: &Tensor, aux: bool) -> Result<Tensor> {
        let router = if aux {
            &self.aux_routers[r]
        } else {
            &self.routers[r]
        };
        Ok(router.forward(&(x / self.temp)?)?.squeeze(1)?)
    }

    /// α·G(logit): the gate of each candidate (paper Eq. 2.1), as a tensor of the logits' shape.
    pub fn gates(&self, logits: &Tensor) -> Result<Tensor> {
        Ok((self.activate(logits)? * self.cfg.alpha)?)
    }

    /// The causal decision of recursion r for the candidate rows `x` [N, d] whose main-router logits are
    /// `main_logits` ([`routing::causal_keep`] on σ of the decode rule's logits: the main router's, or the auxiliary
    /// router's). `thresholds`, when given, replaces the rule's threshold per recursion (routers calibrated to a
    /// target depth distribution, as in `mor bench generate`); a recursion at capacity ≥ 1 still keeps every token.
    pub fn causal_decision(
        &self,
        r: usize,
        x: &Tensor,
        main_logits: &Tensor,
        thresholds: Option<&[f64]>,
    ) -> Result<CausalDecision> {
        let (logits, threshold) = match self.cfg.decode_rule {
            DecodeRule::Threshold { threshold } => (main_logits.clone(), threshold),
            DecodeRule::AuxRouter { threshold } => (self.logits(r, &x.detach(), true)?, threshold),
        };
        let probs: Vec<f32> = candle_nn::ops::sigmoid(&logits)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let threshold = thresholds
            .and_then(|t| t.get(r).copied())
            .unwrap_or(threshold);
        let chosen = routing::causal_keep(&probs, threshold, self.capacities[r] >= 1.0);
        Ok(CausalDecision { chosen, probs })
    }

    /// Route `x` ([B·T, d], flat) through all recursions. `block(r, x, subset)` runs recursion r's shared layers on
    /// the subset and returns its outputs [N_sel, d] in flat order. Also returns x after each recursion.
    pub fn forward(
        &self,
        x: Tensor,
        b: usize,
        t: usize,
        mode: RouteMode,
        block: &mut dyn FnMut(usize, &Tensor, &Subset) -> Result<Tensor>,
    ) -> Result<ExpertForward> {
        let dev = x.device().clone();
        let mut x = x;
        let mut candidates = Subset::full(b, t);
        let mut steps = Vec::with_capacity(self.routers.len());
        let mut losses = RouterLosses::default();
        let mut outputs = Vec::with_capacity(self.routers.len());
        for r in 0..self.routers.len() {
            let cand_idx = Tensor::from_vec(candidates.flat(), candidates.count(), &dev)?;
            let xc = x.index_select(&cand_idx, 0)?;
            let logits = self.logits(r, &xc, false)?;
            let probs = self.gates(&logits)?;
            let chosen = match mode {
                RouteMode::TopK { step } => {
                    let k = top_k(self.capacity(r, step), t);
                    // Decided in f32 whatever the model dtype (an f64 model routes like its f32 twin).
                    let p: Vec<f32> = probs.to_dtype(DType::F32)?.to_vec1()?;
                    routing::top_k_per_sequence(&p, candidates.rows.iter().map(Vec::len), k)
                }
                RouteMode::Causal => self.causal_decision(r, &xc, &logits, None)?.chosen,
            };
            let selected = candidates.filter(&chosen);
            let local: Vec<u32> = (0..chosen.len() as u32)
                .filter(|&i| chosen[i as usize])
                .collect();
            let n_sel = local.len();
            let gates = probs.index_select(&Tensor::from_vec(local, n_sel, &dev)?, 0)?;

            // Auxiliary objectives that teach a causal decision (paper §2.2.1, docs/architecture.md S3).
            let targets = Tensor::from_vec(
                chosen
                    .iter()
                    .map(|&c| f32::from(u8::from(c)))
                    .collect::<Vec<_>>(),
                chosen.len(),
                &dev,
            )?
            .to_dtype(logits.dtype())?;
            let n_cand = chosen.len() as f64;
            if matches!(mode, RouteMode::TopK { .. }) {
                if self.cfg.sampling == Sampling::AuxLoss {
                    let l = (bce_with_logits_sum(&logits, &targets)? / n_cand)?;
                    losses.sampling = Some(add_opt(losses.sampling.take(), l)?);
                }
                if self.cfg.sampling == Sampling::AuxRouter {
                    let aux = self.logits(r, &xc.detach(), true)?;
                    let l = (bce_with_logits_sum(&aux, &targets)? / n_cand)?;
                    losses.aux_router = Some(add_opt(losses.aux_router.take(), l)?);
                }
                if self.z_loss {
                    // logsumexp over a single logit is the logit itself (docs/architecture.md S3).
                    let l = logits.sqr()?.mean_all()?;
                    losses.z = Some(add_opt(losses.z.take(), l)?);
                }
            }

            if n_sel > 0 {
                let upd = routing::apply_gate(self.cfg.gating, block(r, &x, &selected)?, &gates)?;
                let sel_idx = Tensor::from_vec(selected.flat(), n_sel, &dev)?;
                x = x.index_add(&sel_idx, &upd, 0)?;
            }
            steps.push(ExpertStep {
                candidates: candidates.clone(),
                logits,
                probs,
                selected: selected.clone(),
                chosen,
                gates,
            });
            candidates = selected;
            outputs.push(x.clone());
        }
        Ok(ExpertForward {
            x,
            steps,
            losses,
            outputs,
        })
    }
}

/// `acc + l`, starting from nothing.
pub fn add_opt(acc: Option<Tensor>, l: Tensor) -> Result<Tensor> {
    Ok(match acc {
        Some(a) => (a + l)?,
        None => l,
    })
}

/// Agreement of the causal rule σ(logit) ≥ 0.5 with the top-k choice: per recursion the fraction of candidates
/// where they agree, averaged over recursions (the official `sampling_acc`, App. G.2 "sampling accuracy").
pub fn sampling_accuracy(steps: &[ExpertStep]) -> Result<f64> {
    let mut sum = 0.0;
    for s in steps {
        let p: Vec<f32> = candle_nn::ops::sigmoid(&s.logits.to_dtype(DType::F32)?)?.to_vec1()?;
        let agree = p
            .iter()
            .zip(&s.chosen)
            .filter(|(pi, &c)| (**pi >= 0.5) == c)
            .count();
        sum += agree as f64 / p.len().max(1) as f64;
    }
    Ok(if steps.is_empty() {
        0.0
    } else {
        sum / steps.len() as f64
    })
}
