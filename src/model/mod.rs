//! The MoR model: a Llama decoder whose middle layers are one shared block applied N_r times, with optional
//! expert- or token-choice routing (paper §2) and recursive KV sharing (paper §2.2.2).
//!
//! Vanilla (no `recursion`), recursive (no `mor`) and MoR models are all this one type.

pub mod capacity;
pub mod expert_choice;
pub mod layers;
pub mod ops;
pub mod params;
pub mod recursion;
pub mod router;
pub mod routing;
pub mod token_choice;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};

use crate::config::{Layout, ModelConfig};
use crate::error::{MorError, Result};
use expert_choice::{ExpertChoice, ExpertStep, RouteMode, RouterLosses};
use layers::{log_softmax_last, DecoderLayer, KeyValue, RmsNorm, Rope};
use ops::GradSink;
use params::{Init, ParamStore};
use recursion::{run_block, BlockKv, Subset};
use token_choice::{TokenChoice, TokenTrace};

/// The routing component of a model.
#[derive(Debug, Clone)]
pub enum Routing {
    /// Every token runs every layer (vanilla and recursive models).
    None,
    /// Expert-choice routing.
    Expert(ExpertChoice),
    /// Token-choice routing.
    Token(TokenChoice),
}

/// The routing decisions of one forward.
#[derive(Debug, Clone)]
pub enum RoutingTrace {
    /// No routing.
    None,
    /// Expert-choice steps, one per recursion.
    Expert(Vec<ExpertStep>),
    /// Token-choice decisions.
    Token(TokenTrace),
}

/// Options of a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// How expert-choice selects tokens (token-choice reads the training step from it too).
    pub mode: RouteMode,
    /// Record the hidden state at every module boundary.
    pub hidden_states: bool,
}

impl ForwardOptions {
    /// Training forward at optimizer step `step` (capacity / balancing warm-ups).
    pub fn train(step: usize) -> Self {
        ForwardOptions {
            mode: RouteMode::TopK { step: Some(step) },
            hidden_states: false,
        }
    }
    /// Full-sequence evaluation with the paper's (non-causal) top-k.
    pub fn eval() -> Self {
        ForwardOptions {
            mode: RouteMode::TopK { step: None },
            hidden_states: false,
        }
    }
    /// Full-sequence evaluation with the causal rule used by generation (docs/architecture.md S5).
    pub fn causal() -> Self {
        ForwardOptions {
            mode: RouteMode::Causal,
            hidden_states: false,
        }
    }
}

/// Outputs of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Logits [B, T, V].
    pub logits: Tensor,
    /// Routing decisions.
    pub routing: RoutingTrace,
    /// Auxiliary router losses (un-weighted).
    pub router_losses: RouterLosses,
    /// Hidden states at module boundaries (embeddings, after each unique/recursion module, final norm output), if
    /// requested. Matches the official `output_hidden_states` of MoR models.
    pub hidden_states: Vec<Tensor>,
}

/// The terms of the training objective.
#[derive(Debug, Clone)]
pub struct LossBreakdown {
    /// Summed next-token cross-entropy divided by `num_items` (the HF trainer's normalisation).
    pub lm: Tensor,
    /// The objective to differentiate: lm + weighted auxiliary terms (official `trainer_pt.py`).
    pub total: Tensor,
    /// Σ cross-entropy and the number of scored targets (for mean NLL).
    pub ce_sum: Tensor,
    /// Number of scored targets.
    pub n_targets: usize,
}

/// The objective of a training forward ([`MorModel::forward_loss`]): the loss terms and the routing, no logits.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// The loss terms.
    pub loss: LossBreakdown,
    /// Routing decisions.
    pub routing: RoutingTrace,
    /// Auxiliary router losses (un-weighted).
    pub router_losses: RouterLosses,
    /// Weight gradients of checkpointed layers, collected during the backward pass.
    checkpoint: Option<Arc<GradSink>>,
}

impl TrainOutput {
    /// Gradients of `loss.total`, including those of checkpointed layers' weights (which a bare
    /// `loss.total.backward()` would miss: they reach the parameters through `ops::checkpoint`'s sink).
    pub fn backward(&self) -> Result<GradStore> {
        let mut grads = self.loss.total.backward()?;
        if let Some(sink) = &self.checkpoint {
            sink.merge_into(&mut grads)?;
        }
        Ok(grads)
    }
}

/// A MoR / recursive / vanilla Llama model.
#[derive(Debug, Clone)]
pub struct MorModel {
    cfg: ModelConfig,
    layout: Layout,
    embed: Tensor,
    /// One entry per unrolled layer; shared layers are clones of the same weights.
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
    routing: Routing,
    params: ParamStore,
    /// Fused training ops (`ops`) instead of the composed reference ones.
    fused: bool,
    /// Activation checkpointing of every layer in [`Self::forward_loss`].
    checkpointing: bool,
}

impl MorModel {
    /// A freshly initialised model (docs/architecture.md S1: N(0, initializer_range), norms at 1), reproducible from `seed`.
    pub fn new(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Self::init(cfg, ParamStore::new(device, seed))
    }

    /// Initialise every parameter `store` does not hold yet (its dtype and seed decide the values).
    pub fn init(cfg: &ModelConfig, mut store: ParamStore) -> Result<Self> {
        cfg.validate()?;
        Self::build(cfg, &mut store).map(|m| m.with_params(store))
    }

    /// Build the model on parameters that are all present in `store`; any missing or unexpected tensor is an error
    /// naming it.
    pub fn from_params(cfg: &ModelConfig, mut store: ParamStore) -> Result<Self> {
        cfg.validate()?;
        let before: Vec<String> = store.iter().map(|(k, _)| k.clone()).collect();
        let model = Self::build(cfg, &mut store)?;
        let missing: Vec<&String> = store
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !before.contains(k))
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(MorError::Config(format!(
                "missing tensors for {}: {}",
                cfg.variant_name(),
                names.join(", ")
            )));
        }
        if let Some(extra) = before.iter().find(|k| !store.was_requested(k)) {
            return Err(MorError::Config(format!(
                "unexpected tensor {extra} for {}",
                cfg.variant_name()
            )));
        }
        Ok(model.with_params(store))
    }

    /// This model for inference only: same weights (shared storage), no autograd graph, so a forward pass keeps
    /// only the tensors it still needs (see [`ParamStore::frozen`]). Used by evaluation and generation.
    pub fn frozen(&self) -> Result<Self> {
        Self::from_params(&self.cfg, self.params.frozen())
    }

    /// The same model with its parameters converted to `dtype` (for example bf16 weights for inference: the
    /// engine runs them without widening a copy). The parameters are copied, so dropping `self` frees the originals.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Self::from_params(&self.cfg, self.params.to_dtype(dtype)?)
    }

    fn with_params(mut self, store: ParamStore) -> Self {
        self.params = store;
        self
    }

    fn build(cfg: &ModelConfig, store: &mut ParamStore) -> Result<Self> {
        let d = cfg.hidden_size;
        let init = Init::Normal(cfg.initializer_range);
        let embed = store.get_or_init("model.embed_tokens.weight", &[cfg.vocab_size, d], init)?;
        let layout = cfg.layout();
        let mut unique: HashMap<usize, DecoderLayer> = HashMap::new();
        for &u in &layout.unique_layers() {
            unique.insert(
                u,
                DecoderLayer::new(store, &format!("model.layers.{u}"), cfg)?,
            );
        }
        let layers = layout.source.iter().map(|s| unique[s].clone()).collect();
        let norm = RmsNorm::new(store, "model.norm.weight", d, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(store.get_or_init("lm_head.weight", &[cfg.vocab_size, d], init)?)
        };
        let routing = match (cfg.expert_choice(), cfg.token_choice()) {
            (Some(ec), _) => Routing::Expert(ExpertChoice::new(store, cfg, ec)?),
            (_, Some(tc)) => Routing::Token(TokenChoice::new(store, cfg, tc)?),
            _ => Routing::None,
        };
        let rope = Rope::new(
            cfg,
            cfg.max_position_embeddings,
            store.device(),
            store.dtype(),
        )?;
        Ok(MorModel {
            cfg: cfg.clone(),
            layout,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            routing,
            params: ParamStore::with_dtype(store.device(), 0, store.dtype()),
            fused: true,
            checkpointing: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    /// The layer layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The parameters (each shared weight once).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }
    /// The routing component.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }
    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Use the fused training ops of [`ops`] (the default) or the composed reference ops, in every layer, the final
    /// norm and the LM head with its cross-entropy ([`Self::forward_loss`]). Both compute the same function; the
    /// reference path is kept for cross-checks (`tests/fused.rs`).
    pub fn set_fused_ops(&mut self, on: bool) {
        self.fused = on;
        for l in &mut self.layers {
            l.set_fused(on);
        }
        self.norm.set_fused(on);
    }

    /// Whether the fused training ops are in use.
    pub fn fused_ops(&self) -> bool {
        self.fused
    }

    /// Checkpoint the activations of each layer in [`Self::forward_loss`] (off by default): the backward pass
    /// recomputes a layer instead of keeping its intermediates (`ops::checkpoint`). Layers whose K/V a later
    /// recursion reads (recursive KV sharing) keep their graph, since their K/V outlive them.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether activation checkpointing is on.
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The model's unrolled layers, in order.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// RoPE tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Token embeddings of ids [B, T] → [B, T, d].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Final norm and LM head: h [.., d] → logits [.., V].
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        layers::linear(&self.final_norm(h)?, self.head_weight())
    }

    /// The LM head's weight [V, d]: its own, or the token embedding when tied.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final RMSNorm applied before the LM head.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.norm.forward(h)
    }

    /// The unrolled layer whose K/V recursion-depth layer `idx` reads under recursive KV sharing (docs/architecture.md S6,
    /// `RecursiveDynamicCache`): layers of recursions ≥ 1 read the matching layer of recursion 0.
    pub fn kv_source_layer(&self, idx: usize) -> usize {
        let (p, bd) = (self.layout.prefix, self.layout.base_depth);
        if self.cfg.kv_sharing.is_some()
            && idx >= p + bd
            && idx < p + bd * self.layout.num_recursion
        {
            p + (idx - p) % bd
        } else {
            idx
        }
    }

    /// Run the model on ids [B, T] (u32 or i64). T must not exceed the context length.
    pub fn forward(&self, ids: &Tensor, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let (normed, routing, router_losses, hidden_states) =
            self.forward_hidden(ids, opts, None)?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(ForwardOutput {
            logits: layers::linear(&normed, w)?,
            routing,
            router_losses,
            hidden_states,
        })
    }

    /// The forward pass up to and including the final norm: the normed hidden states [B, T, d], the routing, the
    /// router losses and the recorded hidden states.
    fn forward_hidden(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        checkpoint: Option<&Arc<GradSink>>,
    ) -> Result<(Tensor, RoutingTrace, RouterLosses, Vec<Tensor>)> {
        let (b, t) = ids.dims2()?;
        if t == 0 || t > self.rope.max_positions() {
            return Err(MorError::Request(format!(
                "sequence length {t} must be in 1..={}",
                self.rope.max_positions()
            )));
        }
        self.check_ids(ids)?;
        let d = self.cfg.hidden_size;
        let mut hidden = Vec::new();
        let mut x = self.embed(ids)?.reshape((b * t, d))?;
        let keep = |hidden: &mut Vec<Tensor>, x: &Tensor| -> Result<()> {
            if opts.hidden_states {
                hidden.push(x.reshape((b, t, d))?);
            }
            Ok(())
        };
        keep(&mut hidden, &x)?;
        let full = Subset::full(b, t);
        let sharing = self.cfg.kv_sharing.clone();
        let mut kv_slots: HashMap<usize, KeyValue> = HashMap::new();

        // Run unrolled layers `range` on the subset, with KV sharing when configured.
        let run = |range: std::ops::Range<usize>,
                   x: &Tensor,
                   subset: &Subset,
                   slots: &mut HashMap<usize, KeyValue>|
         -> Result<Tensor> {
            let layers: Vec<&DecoderLayer> = self.layers[range.clone()].iter().collect();
            let src: Vec<usize> = range.clone().map(|i| self.kv_source_layer(i)).collect();
            let reads = src.iter().zip(range.clone()).any(|(s, i)| *s != i);
            let shared: Vec<KeyValue> = if reads {
                src.iter().map(|s| slots[s].clone()).collect()
            } else {
                Vec::new()
            };
            let kv = match (&sharing, reads) {
                (Some(k), true) if k.update_cache => BlockKv::SharedUpdate(&shared),
                (_, true) => BlockKv::Shared(&shared),
                _ => BlockKv::Own,
            };
            // Checkpointed layers return no K/V: only where no later recursion reads them.
            let keeps_kv = match &sharing {
                None => false,
                Some(k) => !reads || k.update_cache,
            };
            let ckpt = checkpoint.filter(|_| !keeps_kv);
            let (out, used) = run_block(&layers, x, subset, &self.rope, kv, ckpt)?;
            if sharing.is_some() {
                for (i, kv) in range.zip(used) {
                    let s = self.kv_source_layer(i);
                    if s == i || sharing.as_ref().is_some_and(|k| k.update_cache) {
                        if let Some(kv) = kv {
                            slots.insert(s, kv);
                        }
                    }
                }
            }
            Ok(out)
        };

        let p = self.layout.prefix;
        for i in 0..p {
            x = run(i..i + 1, &x, &full, &mut kv_slots)?;
            keep(&mut hidden, &x)?;
        }
        let (x_mid, routing, router_losses) = match &self.routing {
            Routing::None => {
                let mut x = x;
                let mid = p..self.layout.suffix_layers().start;
                for i in mid {
                    x = run(i..i + 1, &x, &full, &mut kv_slots)?;
                }
                (x, RoutingTrace::None, RouterLosses::default())
            }
            Routing::Expert(ec) => {
                let f = ec.forward(x, b, t, opts.mode, &mut |r, x, s| {
                    run(self.layout.recursion_layers(r), x, s, &mut kv_slots)
                })?;
                // The output of the last recursion is recorded below, like every other module output.
                for h in f.outputs.iter().take(f.outputs.len().saturating_sub(1)) {
                    keep(&mut hidden, h)?;
                }
                (f.x, RoutingTrace::Expert(f.steps), f.losses)
            }
            Routing::Token(tc) => {
                let step = match opts.mode {
                    RouteMode::TopK { step } => step,
                    RouteMode::Causal => None,
                };
                let f = tc.forward(x, b, t, step, &mut |r, x, s| {
                    run(self.layout.recursion_layers(r), x, s, &mut kv_slots)
                })?;
                (f.x, RoutingTrace::Token(f.trace), f.losses)
            }
        };
        let mut x = x_mid;
        keep(&mut hidden, &x)?;
        for i in self.layout.suffix_layers() {
            x = run(i..i + 1, &x, &full, &mut kv_slots)?;
            keep(&mut hidden, &x)?;
        }
        let x = x.reshape((b, t, d))?;
        let normed = self.norm.forward(&x)?;
        if opts.hidden_states {
            // The official list ends with the final-norm output instead of the last layer's raw output.
            hidden.pop();
            hidden.push(normed.clone());
        }
        Ok((normed, routing, router_losses, hidden))
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let max = ids.to_dtype(DType::F64)?.max_all()?.to_scalar::<f64>()?;
        let min = ids.to_dtype(DType::F64)?.min_all()?.to_scalar::<f64>()?;
        if min < 0.0 || max >= self.cfg.vocab_size as f64 {
            return Err(MorError::Request(format!(
                "token id {} is outside the vocabulary (size {})",
                if min < 0.0 { min } else { max },
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// The training objective for `out` on ids [B, T] (labels = ids, shifted inside as HF does). `num_items` is the
    /// HF trainer's normaliser (B·T summed over gradient-accumulation micro-batches; fixtures README "LM loss").
    pub fn loss(
        &self,
        out: &ForwardOutput,
        ids: &Tensor,
        num_items: usize,
    ) -> Result<LossBreakdown> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Err(MorError::Request(format!(
                "the language-model loss needs sequences of at least 2 tokens, got {t}"
            )));
        }
        let v = self.cfg.vocab_size;
        let logits = out.logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let targets = ids
            .narrow(1, 1, t - 1)?
            .to_dtype(DType::U32)?
            .reshape((b * (t - 1), 1))?;
        let logp = log_softmax_last(&logits)?;
        let ce_sum = logp.gather(&targets, D::Minus1)?.sum_all()?.neg()?;
        self.objective(ce_sum, &out.router_losses, b, t, num_items)
    }

    /// Forward pass and training objective on ids [B, T], as [`Self::forward`] then [`Self::loss`] compute it. With
    /// the fused ops the LM head and cross-entropy run in row chunks ([`ops::lm_head_cross_entropy`]), so the
    /// `[B·T, V]` logits never exist.
    pub fn forward_loss(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        num_items: usize,
    ) -> Result<TrainOutput> {
        let sink = self.checkpointing.then(|| Arc::new(GradSink::default()));
        let (b, t) = ids.dims2()?;
        let (normed, routing, router_losses, _) = self.forward_hidden(ids, opts, sink.as_ref())?;
        if !self.fused {
            let w = self.lm_head.as_ref().unwrap_or(&self.embed);
            let out = ForwardOutput {
                logits: layers::linear(&normed, w)?,
                routing,
                router_losses,
                hidden_states: Vec::new(),
            };
            let loss = self.loss(&out, ids, num_items)?;
            return Ok(TrainOutput {
                loss,
                routing: out.routing,
                router_losses: out.router_losses,
                checkpoint: sink,
            });
        }
        let d = self.cfg.hidden_size;
        let h = normed.narrow(1, 0, t - 1)?.reshape((b * (t - 1), d))?;
        let targets: Vec<u32> = ids
            .narrow(1, 1, t - 1)?
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        let ce_sum = ops::lm_head_cross_entropy(&h, w, &targets)?;
        let loss = self.objective(ce_sum, &router_losses, b, t, num_items)?;
        Ok(TrainOutput {
            loss,
            routing,
            router_losses,
            checkpoint: sink,
        })
    }

    /// The objective from the summed cross-entropy and the router losses of a [B, T] batch.
    fn objective(
        &self,
        ce_sum: Tensor,
        l: &RouterLosses,
        b: usize,
        t: usize,
        num_items: usize,
    ) -> Result<LossBreakdown> {
        let lm = (&ce_sum / num_items as f64)?;
        let mut total = lm.clone();
        let scale = (b * t) as f64 / num_items as f64;
        // Weighted auxiliary terms (official trainer_pt.py). The aux router sees detached inputs, so its BCE
        // (weight 1) trains only the aux router, as the official separate backward does.
        let z_coeff = self.cfg.mor.as_ref().map_or(0.0, |m| m.z_coeff);
        let sampling_coeff = self.cfg.expert_choice().map_or(0.0, |e| e.coeff);
        let balancing_coeff = self.cfg.token_choice().map_or(0.0, |t| t.coeff);
        for (term, coeff) in [
            (&l.sampling, sampling_coeff),
            (&l.aux_router, 1.0),
            (&l.balancing, balancing_coeff),
            (&l.z, z_coeff),
        ] {
            if let Some(x) = term {
                total = (total + (x * (coeff * scale))?)?;
            }
        }
        Ok(LossBreakdown {
            lm,
            total,
            ce_sum,
            n_targets: b * (t - 1),
        })
    }

    /// After optimizer step `step`: the loss-free balancing bias update (token-choice with `balancing: loss_free`)
    /// from the expert loads `counts` of that step.
    pub fn update_balancing_bias(&self, counts: &[usize], step: usize) -> Result<()> {
        if let Routing::Token(tc) = &self.routing {
            if let Some(new) = tc.updated_bias(counts, step)? {
                self.params.set(token_choice::BIAS_NAME, &new)?;
            }
        }
        Ok(())
    }
}
