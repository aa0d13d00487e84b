//! Model configuration: a Hugging Face Llama `config.json` plus the MoR fields.
//!
//! Defaults are the paper's final recipe (paper §4, Tables 4 and 14).
//! Every field is documented in docs/config.md. Unknown fields are rejected so that a typo never silently falls back
//! to a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{MorError, Result};

pub mod flops;
pub mod layout;
pub mod presets;

pub use layout::{Layout, Sharing};

/// How the shared layers of a recursive model are initialised when uptraining from a vanilla model
/// (official `recursive.initialization`). Scratch runs use `Random`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Initialization {
    /// Evenly spaced source layers.
    Stepwise,
    /// Average of the source layers mapped to each shared layer.
    Average,
    /// The lowest source layers.
    Lower,
    /// The highest source layers.
    Upper,
    /// Randomly chosen pretrained layers when uptraining (official semantics); a fresh random init from scratch.
    #[default]
    Random,
}

/// Recursion (parameter sharing) settings. Absent = vanilla model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecursionConfig {
    /// Sharing strategy.
    #[serde(default = "default_sharing")]
    pub sharing: Sharing,
    /// Number of recursions N_r.
    pub num_recursion: usize,
    /// Initialisation of shared layers when uptraining.
    #[serde(default)]
    pub initialization: Initialization,
}

fn default_sharing() -> Sharing {
    Sharing::MiddleCycle
}

/// Recursive KV sharing (paper §2.2.2): deeper recursions reuse the first recursion's K/V.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KvSharingConfig {
    /// Hybrid variant "†": start from the first recursion's K/V and overwrite the selected positions with fresh K/V.
    #[serde(default)]
    pub update_cache: bool,
}

/// Router network architecture (official `mor.router_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterType {
    /// Linear(d, out), no bias. The paper's choice.
    Linear,
    /// Linear(d, h) -> GELU -> Linear(h, out), no biases; h defaults to 2d (as the official code).
    Mlp,
    /// Same as `Mlp` but h defaults to 4d (as the paper says; the official code uses 2d, docs/architecture.md S3).
    WideMlp,
}

/// Expert-choice router activation G (paper Eq. 2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertRouterFunc {
    /// σ(logit).
    Sigmoid,
    /// tanh(logit).
    Tanh,
    /// Raw logits (the paper reports this diverges).
    None,
}

/// Token-choice router activation over the N_r experts (paper Eq. 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRouterFunc {
    /// softmax over experts.
    Softmax,
    /// Independent σ per expert.
    Sigmoid,
}

/// How the expert-choice router learns a causal (inference-time) decision (paper §2.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// BCE on the main router's logits against the top-k targets (the paper's choice).
    AuxLoss,
    /// A separate router trained on detached inputs with the same BCE.
    AuxRouter,
    /// No causality fix.
    None,
}

/// How the router weight enters the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// H ← H + g·Block(H) (official default).
    Weighted,
    /// H ← H + Block(H) for selected tokens (gate not applied).
    Additive,
}

/// Causal routing rule for expert-choice at generation time (docs/architecture.md S5; no official rule exists).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum DecodeRule {
    /// Continue while σ(main router logit) ≥ threshold, hierarchically.
    Threshold {
        /// Probability threshold (0.5: what the aux BCE trains for).
        threshold: f64,
    },
    /// Continue while σ(aux router logit) ≥ threshold (needs `sampling: aux_router`).
    AuxRouter {
        /// Probability threshold.
        threshold: f64,
    },
}

impl Default for DecodeRule {
    fn default() -> Self {
        DecodeRule::Threshold { threshold: 0.5 }
    }
}

/// Load balancing for token-choice routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    /// Auxiliary balancing loss α Σ f_i P_i (paper App. A.2).
    Loss,
    /// Loss-free balancing: a per-expert bias on the selection, updated after each step (Wang et al. 2024).
    LossFree,
    /// No balancing.
    None,
}

/// Expert-choice routing (paper §2.2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertChoiceConfig {
    /// Capacity per recursion; `None` = (N_r − r)/N_r for r = 0..N_r (docs/architecture.md S3).
    #[serde(default)]
    pub capacity: Option<Vec<f64>>,
    /// Router activation G.
    #[serde(default = "default_expert_func")]
    pub router_func: ExpertRouterFunc,
    /// Router output scale α.
    #[serde(default = "default_expert_alpha")]
    pub alpha: f64,
    /// Causality fix used in training.
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    /// Coefficient of the auxiliary BCE loss.
    #[serde(default = "default_expert_coeff")]
    pub coeff: f64,
    /// Gating.
    #[serde(default = "default_gating")]
    pub gating: Gating,
    /// Cosine capacity warm-up from 1.0 over this many training steps (0 = off).
    #[serde(default)]
    pub cap_warmup_step: usize,
    /// Causal rule used by generation and causal evaluation.
    #[serde(default)]
    pub decode_rule: DecodeRule,
}

/// Token-choice routing (paper §2.2.1, Eq. 2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenChoiceConfig {
    /// Router activation.
    #[serde(default = "default_token_func")]
    pub router_func: TokenRouterFunc,
    /// Router output scale α (1.0 for softmax, 0.1 for sigmoid in the paper).
    #[serde(default = "default_token_alpha")]
    pub alpha: f64,
    /// Balancing method.
    #[serde(default = "default_balancing")]
    pub balancing: Balancing,
    /// Coefficient of the balancing loss.
    #[serde(default = "default_token_coeff")]
    pub coeff: f64,
    /// Loss-free bias update rate u.
    #[serde(default = "default_u")]
    pub u: f64,
    /// Steps during which every token is sent to the deepest expert and the bias is zero.
    #[serde(default)]
    pub bal_warmup_step: usize,
    /// Gating of the final recursion.
    #[serde(default = "default_gating")]
    pub gating: Gating,
}

/// Which routing a MoR model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingKind {
    /// Expert-choice: each recursion picks its top-k tokens.
    Expert(ExpertChoiceConfig),
    /// Token-choice: each token picks its depth once.
    Token(TokenChoiceConfig),
}

/// MoR routing settings. Absent = recursive model without routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MorConfig {
    /// Router network architecture.
    #[serde(default = "default_router_type")]
    pub router_type: RouterType,
    /// Hidden width of MLP routers; `None` = 2d for `mlp`, 4d for `wide_mlp` (docs/architecture.md S3).
    #[serde(default)]
    pub router_hidden: Option<usize>,
    /// The router reads x / temp.
    #[serde(default = "one")]
    pub temp: f64,
    /// Add the router z-loss (paper App. G.1).
    #[serde(default)]
    pub z_loss: bool,
    /// z-loss coefficient.
    #[serde(default = "default_z_coeff")]
    pub z_coeff: f64,
    /// Expert- or token-choice and its settings.
    pub routing: RoutingKind,
}

/// The whole model configuration: HF Llama fields plus `recursion`, `mor` and `kv_sharing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Unrolled layer count L (for MoR/recursive models: before any adjustment to N_r, see [`Layout`]).
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Head width; default hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Context length.
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    /// Tie the LM head to the input embedding.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// Std of the N(0, σ) initialisation.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// BOS id (unused by the paper's pipeline).
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// EOS id (0 for SmolLM).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Pad id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Parameter sharing; absent = vanilla.
    #[serde(default)]
    pub recursion: Option<RecursionConfig>,
    /// Routing; absent = no routing.
    #[serde(default)]
    pub mor: Option<MorConfig>,
    /// Recursive KV sharing; absent = recursion-wise caching.
    #[serde(default)]
    pub kv_sharing: Option<KvSharingConfig>,

    // Hugging Face fields accepted for interoperability; each must hold the value mor implements.
    /// HF bookkeeping, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Must be "llama" if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Must be "silu" if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Must be false if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Must be false if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Must be null if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Ignored (no dropout in mor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_dropout: Option<f64>,
    /// HF bookkeeping, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// HF bookkeeping, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    /// HF bookkeeping, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_cache: Option<bool>,
    /// Must be 1 if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretraining_tp: Option<usize>,
}

fn default_expert_func() -> ExpertRouterFunc {
    ExpertRouterFunc::Sigmoid
}
fn default_expert_alpha() -> f64 {
    0.1
}
fn default_sampling() -> Sampling {
    Sampling::AuxLoss
}
fn default_expert_coeff() -> f64 {
    0.001
}
fn default_gating() -> Gating {
    Gating::Weighted
}
fn default_token_func() -> TokenRouterFunc {
    TokenRouterFunc::Softmax
}
fn default_token_alpha() -> f64 {
    1.0
}
fn default_balancing() -> Balancing {
    Balancing::Loss
}
fn default_token_coeff() -> f64 {
    0.1
}
fn default_u() -> f64 {
    0.001
}
fn default_router_type() -> RouterType {
    RouterType::Linear
}
fn default_z_coeff() -> f64 {
    1e-3
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}
fn default_init() -> f64 {
    0.02
}

impl Default for ExpertChoiceConfig {
    fn default() -> Self {
        ExpertChoiceConfig {
            capacity: None,
            router_func: default_expert_func(),
            alpha: default_expert_alpha(),
            sampling: default_sampling(),
            coeff: default_expert_coeff(),
            gating: default_gating(),
            cap_warmup_step: 0,
            decode_rule: DecodeRule::default(),
        }
    }
}

impl Default for TokenChoiceConfig {
    fn default() -> Self {
        TokenChoiceConfig {
            router_func: default_token_func(),
            alpha: default_token_alpha(),
            balancing: default_balancing(),
            coeff: default_token_coeff(),
            u: default_u(),
            bal_warmup_step: 0,
            gating: default_gating(),
        }
    }
}

impl MorConfig {
    /// The paper's final expert-choice recipe (Table 13, last row).
    pub fn expert() -> Self {
        MorConfig {
            router_type: RouterType::Linear,
            router_hidden: None,
            temp: 1.0,
            z_loss: false,
            z_coeff: default_z_coeff(),
            routing: RoutingKind::Expert(ExpertChoiceConfig::default()),
        }
    }
    /// The paper's final token-choice recipe (Table 14, chosen row; z-loss off as in that row).
    pub fn token() -> Self {
        MorConfig {
            router_type: RouterType::Linear,
            router_hidden: None,
            temp: 1.0,
            z_loss: false,
            z_coeff: 1e-5,
            routing: RoutingKind::Token(TokenChoiceConfig::default()),
        }
    }
    /// Hidden width of an MLP router for model width `d`.
    pub fn router_hidden_width(&self, d: usize) -> usize {
        match (self.router_hidden, self.router_type) {
            (Some(h), _) => h,
            (None, RouterType::WideMlp) => 4 * d,
            (None, _) => 2 * d,
        }
    }
}

impl ModelConfig {
    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of recursions N_r (1 for a vanilla model).
    pub fn num_recursion(&self) -> usize {
        self.recursion.as_ref().map_or(1, |r| r.num_recursion)
    }

    /// Expert-choice settings, if this is an expert-choice MoR model.
    pub fn expert_choice(&self) -> Option<&ExpertChoiceConfig> {
        match self.mor.as_ref().map(|m| &m.routing) {
            Some(RoutingKind::Expert(e)) => Some(e),
            _ => None,
        }
    }

    /// Token-choice settings, if this is a token-choice MoR model.
    pub fn token_choice(&self) -> Option<&TokenChoiceConfig> {
        match self.mor.as_ref().map(|m| &m.routing) {
            Some(RoutingKind::Token(t)) => Some(t),
            _ => None,
        }
    }

    /// Capacity of each recursion (paper §2.2.1: (N_r − r)/N_r for r = 0..N_r unless configured).
    pub fn capacities(&self) -> Vec<f64> {
        let n = self.num_recursion();
        match self.expert_choice().and_then(|e| e.capacity.clone()) {
            Some(c) => c,
            None => (0..n).map(|r| (n - r) as f64 / n as f64).collect(),
        }
    }

    /// The layer layout implied by `recursion` (see [`crate::config::layout`]).
    pub fn layout(&self) -> Layout {
        Layout::new(
            self.recursion
                .as_ref()
                .map(|r| (r.sharing, r.num_recursion)),
            self.num_hidden_layers,
        )
    }

    /// A warning when the configured layer count is not a multiple of N_r (docs/architecture.md S2), else `None`.
    pub fn layout_warning(&self) -> Option<String> {
        let layout = self.layout();
        (layout.num_layers() != self.num_hidden_layers).then(|| {
            format!(
                "num_hidden_layers = {} is not 2 + k·N_r / k·N_r: using {} unique and {} unrolled layers \
                 (the paper's main runs add layers so the division is exact)",
                self.num_hidden_layers,
                layout.unique_layers().len(),
                layout.num_layers()
            )
        })
    }

    /// Check every field and cross-field constraint, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(MorError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "num_attention_heads = {} does not divide hidden_size = {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "num_key_value_heads = {} does not divide num_attention_heads = {}",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return err(format!(
                "head_dim = {} must be even and positive for RoPE",
                self.head_dim()
            ));
        }
        if self.rms_norm_eps <= 0.0 || !self.rms_norm_eps.is_finite() {
            return err(format!(
                "rms_norm_eps = {} must be positive",
                self.rms_norm_eps
            ));
        }
        if self.rope_theta <= 0.0 || !self.rope_theta.is_finite() {
            return err(format!("rope_theta = {} must be positive", self.rope_theta));
        }
        if let Some(m) = &self.model_type {
            if m != "llama" && m != "mor" {
                return err(format!(
                    "model_type = {m:?}: only Llama-family models are supported"
                ));
            }
        }
        if let Some(a) = &self.hidden_act {
            if a != "silu" {
                return err(format!(
                    "hidden_act = {a:?}: only SwiGLU (silu) is supported"
                ));
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            return err(
                "attention_bias / mlp_bias: biases are not supported (Llama has none)".into(),
            );
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return err("rope_scaling: RoPE scaling is not supported".into());
        }
        if self.pretraining_tp.is_some_and(|t| t != 1) {
            return err("pretraining_tp must be 1".into());
        }
        if let Some(rec) = &self.recursion {
            let n = rec.num_recursion;
            if n == 0 {
                return err("recursion.num_recursion must be at least 1".into());
            }
            let middle = matches!(rec.sharing, Sharing::MiddleCycle | Sharing::MiddleSequence);
            let inner = self
                .num_hidden_layers
                .saturating_sub(if middle { 2 } else { 0 });
            if inner < n {
                return err(format!(
                    "recursion: {:?} sharing with num_recursion = {n} needs at least {} layers, num_hidden_layers = {}",
                    rec.sharing,
                    n + if middle { 2 } else { 0 },
                    self.num_hidden_layers
                ));
            }
        }
        if let Some(mor) = &self.mor {
            let Some(rec) = &self.recursion else {
                return err(
                    "mor: routing needs `recursion` (a shared block to route through)".into(),
                );
            };
            if !matches!(rec.sharing, Sharing::Cycle | Sharing::MiddleCycle) {
                return err(format!(
                    "mor: routing needs cycle or middle_cycle sharing (a block applied N_r times), got {:?}",
                    rec.sharing
                ));
            }
            if mor.temp <= 0.0 || !mor.temp.is_finite() {
                return err(format!("mor.temp = {} must be positive", mor.temp));
            }
            if mor.router_hidden == Some(0) {
                return err("mor.router_hidden must be positive".into());
            }
            match &mor.routing {
                RoutingKind::Expert(e) => {
                    if let Some(c) = &e.capacity {
                        if c.len() != rec.num_recursion {
                            return err(format!(
                                "mor.routing.expert.capacity has {} entries, num_recursion is {}",
                                c.len(),
                                rec.num_recursion
                            ));
                        }
                        if c.iter().any(|&x| !(x > 0.0 && x <= 1.0)) {
                            return err(
                                "mor.routing.expert.capacity: each value must be in (0, 1]".into(),
                            );
                        }
                        if c.windows(2).any(|w| w[1] > w[0]) {
                            return err("mor.routing.expert.capacity must not increase with depth (hierarchical filtering)".into());
                        }
                    }
                    if e.alpha.is_nan() || e.alpha <= 0.0 {
                        return err(format!(
                            "mor.routing.expert.alpha = {} must be positive",
                            e.alpha
                        ));
                    }
                    if let DecodeRule::AuxRouter { .. } = e.decode_rule {
                        if e.sampling != Sampling::AuxRouter {
                            return err("mor.routing.expert.decode_rule = aux_router needs sampling = aux_router".into());
                        }
                    }
                }
                RoutingKind::Token(t) => {
                    if t.alpha.is_nan() || t.alpha <= 0.0 {
                        return err(format!(
                            "mor.routing.token.alpha = {} must be positive",
                            t.alpha
                        ));
                    }
                }
            }
        }
        if self.kv_sharing.is_some() {
            let Some(rec) = &self.recursion else {
                return err("kv_sharing needs `recursion`".into());
            };
            if !matches!(rec.sharing, Sharing::Cycle | Sharing::MiddleCycle) {
                return err(format!(
                    "kv_sharing needs cycle or middle_cycle sharing, got {:?}",
                    rec.sharing
                ));
            }
            if self.token_choice().is_some() {
                return err("kv_sharing with token-choice routing is not supported (the official code has no such path)".into());
            }
        }
        Ok(())
    }

    /// Parse and validate a config.json, naming the file in every error.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| MorError::io(path, e))?;
        Self::from_json(&text)
            .map_err(|e| MorError::Config(format!("{}: {}", path.display(), strip_prefix(&e))))
    }

    /// Parse and validate config JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: ModelConfig =
            serde_json::from_str(text).map_err(|e| MorError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pretty JSON, HF-style.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// A human-readable name of the variant, e.g. "MoR-expert middle_cycle N_r=3".
    pub fn variant_name(&self) -> String {
        match (&self.recursion, &self.mor) {
            (None, _) => format!("vanilla {}L", self.num_hidden_layers),
            (Some(r), None) => format!("recursive {:?} N_r={}", r.sharing, r.num_recursion),
            (Some(r), Some(m)) => format!(
                "MoR-{} {:?} N_r={}",
                match m.routing {
                    RoutingKind::Expert(_) => "expert",
                    RoutingKind::Token(_) => "token",
                },
                r.sharing,
                r.num_recursion
            ),
        }
    }
}

fn strip_prefix(e: &MorError) -> String {
    match e {
        MorError::Config(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(l: usize, sharing: Option<(Sharing, usize)>) -> ModelConfig {
        let mut j = serde_json::json!({
            "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": l,
            "num_attention_heads": 4, "num_key_value_heads": 2
        });
        if let Some((s, n)) = sharing {
            j["recursion"] = serde_json::json!({"sharing": s, "num_recursion": n});
        }
        ModelConfig::from_json(&j.to_string()).unwrap()
    }

    #[test]
    fn non_divisible_layers_are_warned_about() {
        let c = base(30, Some((Sharing::MiddleCycle, 3)));
        assert!(c.layout_warning().unwrap().contains("11 unique"));
        assert!(base(32, Some((Sharing::MiddleCycle, 3)))
            .layout_warning()
            .is_none());
    }

    #[test]
    fn default_capacities_follow_the_paper() {
        let mut c = base(8, Some((Sharing::MiddleCycle, 3)));
        c.mor = Some(MorConfig::expert());
        let caps = c.capacities();
        assert_eq!(caps.len(), 3);
        assert!((caps[0] - 1.0).abs() < 1e-12 && (caps[2] - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_field_named() {
        let bad = [
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":5,"num_key_value_heads":5}"#,
                "does not divide hidden_size",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3}"#,
                "num_key_value_heads",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"hiden_size":3}"#,
                "unknown field",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"recursion":{"num_recursion":3}}"#,
                "needs at least 5 layers",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":8,"num_attention_heads":4,"num_key_value_heads":2,"recursion":{"sharing":"sequence","num_recursion":2},"mor":{"routing":{"expert":{}}}}"#,
                "cycle or middle_cycle",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":8,"num_attention_heads":4,"num_key_value_heads":2,"mor":{"routing":{"token":{}}}}"#,
                "needs `recursion`",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":8,"num_attention_heads":4,"num_key_value_heads":2,"recursion":{"num_recursion":3},"mor":{"routing":{"expert":{"capacity":[1.0,0.5]}}}}"#,
                "capacity has 2 entries",
            ),
            (
                r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"hidden_act":"gelu"}"#,
                "hidden_act",
            ),
            ("{not json", "key must be a string"),
        ];
        for (text, want) in bad {
            let e = ModelConfig::from_json(text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn round_trips_through_json() {
        let mut c = base(8, Some((Sharing::MiddleCycle, 3)));
        c.mor = Some(MorConfig::token());
        let back = ModelConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }
}
