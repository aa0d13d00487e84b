//! Up-training: turn a pretrained vanilla Llama into a recursive or MoR model (paper §3 / App. "uptraining",
//! official `model/sharing_strategy/llama.py`), then continue training with the normal [`crate::train::trainer::Trainer`].
//!
//! Notation: the source has L layers; the target shares with strategy S and N_r recursions; p = 1 for
//! Middle-Cycle/Middle-Sequence (first and last layers stay unique) and 0 otherwise; the shared block has
//! `bd = (L − 2p) / N_r` layers (integer division) and the target unrolls L' = bd·N_r + 2p layers.
//!
//! 1. **Layer adjustment** (official `sharing_strategy`): if L' < L, the source is first reduced to L' layers by
//!    keeping layer 0 and L−1 (Middle-*) and the layers `round(np.linspace(p, L−1−p, bd·N_r))` between them
//!    (Python `round`, i.e. ties to even). [`kept_layers`] returns this list; all indices below are positions in
//!    the reduced stack, mapped back to source layers through it.
//! 2. **Unique layers** (Middle-*: first and last) are copied. Embeddings, the final norm and an untied LM head are
//!    copied. Routers (MoR) are freshly initialised from the seed, N(0, initializer_range).
//! 3. **Shared layer i** (i < bd; under Middle-Cycle it is applied at unrolled positions 1 + i + r·bd, r < N_r)
//!    takes all its weights, RMSNorms included, from:
//!    - `stepwise`: position `round(np.linspace(p, L'−1−p, bd))[i]` — evenly spaced layers spanning the
//!      shareable range (official `selection_initialize`);
//!    - `average`: the element-wise mean of the positions that will share it (Middle-Cycle: 1 + i + r·bd for
//!      r < N_r; Middle-Sequence: 1 + i·N_r + r) — official `average_initialize`;
//!    - `lower`: position p + i (the bd lowest shareable layers);
//!    - `upper`: position L' − p − bd + i (the bd highest shareable layers);
//!    - `random`: the i-th smallest of bd positions drawn without replacement from p..L'−p (official:
//!      `np.random.choice`; here seeded). Note that this selects random *pretrained layers*, as the official
//!      code does; scratch training (fresh weights) is simply `mor train` without up-training.

use candle_core::Tensor;
use rand::SeedableRng;

use crate::config::{Initialization, MorConfig, RecursionConfig, Sharing};
use crate::error::{MorError, Result};
use crate::model::params::ParamStore;
use crate::model::MorModel;
use crate::ModelConfig;

/// Per-layer parameter suffixes (HF Llama names below `model.layers.{l}.`).
pub const LAYER_PARAMS: [&str; 9] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
];

/// `np.linspace(start, stop, num)` rounded like Python's `round` (ties to even).
pub fn linspace_round(start: f64, stop: f64, num: usize) -> Vec<usize> {
    match num {
        0 => vec![],
        1 => vec![start.round_ties_even() as usize],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            (0..num)
                .map(|k| {
                    let x = if k == num - 1 {
                        stop
                    } else {
                        start + k as f64 * step
                    };
                    x.round_ties_even() as usize
                })
                .collect()
        }
    }
}

fn is_middle(s: Sharing) -> bool {
    matches!(s, Sharing::MiddleCycle | Sharing::MiddleSequence)
}

/// The source layers kept when `layers` is not 2p + a multiple of N_r (step 1 of the module docs); the identity
/// otherwise. Entry q is the source layer at position q of the reduced stack.
pub fn kept_layers(layers: usize, sharing: Sharing, num_recursion: usize) -> Vec<usize> {
    let p = usize::from(is_middle(sharing));
    let n = num_recursion.max(1);
    let inner = layers.saturating_sub(2 * p);
    let bd = inner / n;
    if bd * n == inner {
        return (0..layers).collect();
    }
    let mid = linspace_round(p as f64, (layers - 1 - p) as f64, bd * n);
    if p == 1 {
        std::iter::once(0)
            .chain(mid)
            .chain(std::iter::once(layers - 1))
            .collect()
    } else {
        mid
    }
}

/// For each unique (canonical) layer of `target`, the source layers whose mean initialises it (a single layer for
/// every strategy except `average`). `source_layers` is L, the source model's layer count; `seed` drives `random`.
pub fn source_assignment(
    target: &ModelConfig,
    source_layers: usize,
    seed: u64,
) -> Result<Vec<(usize, Vec<usize>)>> {
    let rec = target.recursion.as_ref().ok_or_else(|| {
        MorError::Config("uptraining needs a target with `recursion` (sharing and N_r)".into())
    })?;
    if target.num_hidden_layers != source_layers {
        return Err(MorError::Config(format!(
            "target num_hidden_layers = {} must equal the source's layer count {source_layers}",
            target.num_hidden_layers
        )));
    }
    let layout = target.layout();
    let kept = kept_layers(source_layers, rec.sharing, rec.num_recursion);
    let lp = layout.num_layers();
    if kept.len() != lp {
        return Err(MorError::Config(format!(
            "internal: {} kept layers for {lp} unrolled layers",
            kept.len()
        )));
    }
    let (p, bd) = (layout.prefix, layout.base_depth);
    let shared_range = p..p + bd * layout.num_recursion;
    let shared: Vec<usize> = layout
        .unique_layers()
        .into_iter()
        .filter(|c| shared_range.contains(c))
        .collect();
    let picks: Vec<usize> = match rec.initialization {
        Initialization::Stepwise => linspace_round(p as f64, (lp - 1 - p) as f64, bd),
        Initialization::Lower => (p..p + bd).collect(),
        Initialization::Upper => (lp - p - bd..lp - p).collect(),
        Initialization::Random => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut v: Vec<usize> = rand::seq::index::sample(&mut rng, lp - 2 * p, bd)
                .into_iter()
                .map(|x| x + p)
                .collect();
            v.sort_unstable();
            v
        }
        Initialization::Average => Vec::new(),
    };
    let mut out = Vec::new();
    for c in layout.unique_layers() {
        let positions: Vec<usize> = (0..lp).filter(|&q| layout.source[q] == c).collect();
        let src: Vec<usize> = if !shared_range.contains(&c) {
            positions.iter().map(|&q| kept[q]).collect()
        } else if rec.initialization == Initialization::Average {
            positions.iter().map(|&q| kept[q]).collect()
        } else {
            let i = shared.iter().position(|&s| s == c).unwrap_or(0);
            vec![kept[picks[i]]]
        };
        out.push((c, src));
    }
    Ok(out)
}

/// The target config of an up-training run: the source's shape with the given sharing, N_r, initialisation and
/// optional routing (`None` = recursive model without routing). Validated.
pub fn uptrain_config(
    source: &ModelConfig,
    sharing: Sharing,
    num_recursion: usize,
    initialization: Initialization,
    mor: Option<MorConfig>,
) -> Result<ModelConfig> {
    if source.recursion.is_some() || source.mor.is_some() {
        return Err(MorError::Config(format!(
            "uptraining starts from a vanilla model, the source is {}",
            source.variant_name()
        )));
    }
    let mut cfg = source.clone();
    cfg.recursion = Some(RecursionConfig {
        sharing,
        num_recursion,
        initialization,
    });
    cfg.mor = mor;
    cfg.kv_sharing = None;
    cfg.validate()?;
    Ok(cfg)
}

/// Build the up-trained model: `target` (from [`uptrain_config`]) initialised from the vanilla `source` following
/// `target.recursion.initialization` (see the module docs); routers are initialised from `seed`.
pub fn uptrain_model(source: &MorModel, target: &ModelConfig, seed: u64) -> Result<MorModel> {
    let scfg = source.config();
    if scfg.recursion.is_some() {
        return Err(MorError::Config(format!(
            "uptraining starts from a vanilla model, the source is {}",
            scfg.variant_name()
        )));
    }
    for (name, a, b) in [
        ("hidden_size", scfg.hidden_size, target.hidden_size),
        (
            "intermediate_size",
            scfg.intermediate_size,
            target.intermediate_size,
        ),
        ("vocab_size", scfg.vocab_size, target.vocab_size),
        (
            "num_attention_heads",
            scfg.num_attention_heads,
            target.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            scfg.num_key_value_heads,
            target.num_key_value_heads,
        ),
        ("head_dim", scfg.head_dim(), target.head_dim()),
    ] {
        if a != b {
            return Err(MorError::Config(format!(
                "target {name} = {b} differs from the source's {a}"
            )));
        }
    }
    if scfg.tie_word_embeddings != target.tie_word_embeddings {
        return Err(MorError::Config(
            "target tie_word_embeddings differs from the source's".into(),
        ));
    }
    target.validate()?;
    let assignment = source_assignment(target, scfg.num_hidden_layers, seed)?;
    let sp = source.params();
    let get = |name: &str| -> Result<Tensor> {
        sp.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| MorError::Config(format!("source model has no parameter {name}")))
    };
    let mut store = ParamStore::with_dtype(sp.device(), seed, sp.dtype());
    for name in ["model.embed_tokens.weight", "model.norm.weight"] {
        store.insert(name, &get(name)?)?;
    }
    if !target.tie_word_embeddings {
        store.insert("lm_head.weight", &get("lm_head.weight")?)?;
    }
    for (c, src) in &assignment {
        for suffix in LAYER_PARAMS {
            let mut acc: Option<Tensor> = None;
            for s in src {
                let t = get(&format!("model.layers.{s}.{suffix}"))?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            let t = acc.ok_or_else(|| {
                MorError::Config(format!("internal: no source layer for layer {c}"))
            })?;
            let t = if src.len() > 1 {
                (t / src.len() as f64)?
            } else {
                t
            };
            store.insert(&format!("model.layers.{c}.{suffix}"), &t)?;
        }
    }
    MorModel::init(target, store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vanilla(layers: usize) -> MorModel {
        let cfg = ModelConfig::from_json(&format!(
            r#"{{"vocab_size":64,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":{layers},
                "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16}}"#
        ))
        .unwrap();
        let m = MorModel::new(&cfg, &Device::Cpu, 11).unwrap();
        // Distinct norms per layer, so a wrong norm source would show.
        for l in 0..layers {
            for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                let name = format!("model.layers.{l}.{n}");
                let t = Tensor::full(l as f32 + 0.5, 16, &Device::Cpu).unwrap();
                m.params().set(&name, &t).unwrap();
            }
        }
        m
    }

    fn w(m: &MorModel, layer: usize, suffix: &str) -> Vec<f32> {
        m.params()
            .get(&format!("model.layers.{layer}.{suffix}"))
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn uptrain(src: &MorModel, sharing: Sharing, n: usize, init: Initialization) -> MorModel {
        // Routing needs a block applied N_r times; sequence-type sharing becomes a plain recursive model.
        let routing =
            matches!(sharing, Sharing::Cycle | Sharing::MiddleCycle).then(MorConfig::expert);
        let cfg = uptrain_config(src.config(), sharing, n, init, routing).unwrap();
        uptrain_model(src, &cfg, 3).unwrap()
    }

    fn assert_source(up: &MorModel, src: &MorModel, target: usize, sources: &[usize]) {
        for suffix in LAYER_PARAMS {
            let got = w(up, target, suffix);
            let mut want = vec![0f32; got.len()];
            for &s in sources {
                for (a, b) in want.iter_mut().zip(w(src, s, suffix)) {
                    *a += b / sources.len() as f32;
                }
            }
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-6,
                "layer {target} {suffix}: not from {sources:?} ({diff})"
            );
        }
    }

    #[test]
    fn linspace_rounds_like_numpy() {
        assert_eq!(linspace_round(0.0, 9.0, 4), vec![0, 3, 6, 9]);
        // np.linspace(0, 5, 3) = [0, 2.5, 5]; Python round(2.5) = 2.
        assert_eq!(linspace_round(0.0, 5.0, 3), vec![0, 2, 5]);
        assert_eq!(linspace_round(1.0, 7.0, 6), vec![1, 2, 3, 5, 6, 7]);
        assert_eq!(linspace_round(1.0, 6.0, 1), vec![1]);
        // The 135M model (30 layers) with N_r = 3 keeps 29 distinct layers, first and last included.
        let k = kept_layers(30, Sharing::MiddleCycle, 3);
        assert_eq!(k.len(), 29);
        assert!(k.windows(2).all(|p| p[0] < p[1]));
        assert_eq!((k[0], k[1], k[27], k[28]), (0, 1, 28, 29));
        assert_eq!(
            kept_layers(8, Sharing::MiddleCycle, 3),
            (0..8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn each_initialisation_takes_the_documented_layers() {
        // L = 8, Middle-Cycle, N_r = 3: bd = 2, unrolled [0, 1,2, 1,2, 1,2, 7].
        let src = vanilla(8);
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Lower);
        assert_eq!(up.layout().source, vec![0, 1, 2, 1, 2, 1, 2, 7]);
        assert_source(&up, &src, 0, &[0]);
        assert_source(&up, &src, 7, &[7]);
        assert_source(&up, &src, 1, &[1]);
        assert_source(&up, &src, 2, &[2]);
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Upper);
        assert_source(&up, &src, 1, &[5]);
        assert_source(&up, &src, 2, &[6]);
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Stepwise);
        assert_source(&up, &src, 1, &[1]);
        assert_source(&up, &src, 2, &[6]);
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Average);
        assert_source(&up, &src, 1, &[1, 3, 5]);
        assert_source(&up, &src, 2, &[2, 4, 6]);
        assert_source(&up, &src, 7, &[7]);
        // Random: distinct pretrained layers from the shareable range, reproducible from the seed.
        let cfg = uptrain_config(
            src.config(),
            Sharing::MiddleCycle,
            3,
            Initialization::Random,
            None,
        )
        .unwrap();
        let a = source_assignment(&cfg, 8, 3).unwrap();
        assert_eq!(a, source_assignment(&cfg, 8, 3).unwrap());
        let (s1, s2) = (a[1].1[0], a[2].1[0]);
        assert!(
            s1 < s2 && (1..7).contains(&s1) && (1..7).contains(&s2),
            "{a:?}"
        );
        let up = uptrain_model(&src, &cfg, 3).unwrap();
        assert_source(&up, &src, 1, &[s1]);
        // Middle-Sequence average: positions 1 + i·N_r + r.
        let up = uptrain(&src, Sharing::MiddleSequence, 3, Initialization::Average);
        assert_eq!(up.layout().source, vec![0, 1, 1, 1, 4, 4, 4, 7]);
        assert_source(&up, &src, 1, &[1, 2, 3]);
        assert_source(&up, &src, 4, &[4, 5, 6]);
    }

    #[test]
    fn non_divisible_depths_subsample_first() {
        // L = 9, N_r = 3: bd = 2, kept = [0, 1, 2, 3, 5, 6, 7, 8].
        let src = vanilla(9);
        assert_eq!(
            kept_layers(9, Sharing::MiddleCycle, 3),
            vec![0, 1, 2, 3, 5, 6, 7, 8]
        );
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Average);
        assert_source(&up, &src, 1, &[1, 3, 6]);
        assert_source(&up, &src, 2, &[2, 5, 7]);
        assert_source(&up, &src, 7, &[8]);
        let up = uptrain(&src, Sharing::MiddleCycle, 3, Initialization::Upper);
        assert_source(&up, &src, 1, &[6]);
        assert_source(&up, &src, 2, &[7]);
    }

    #[test]
    fn one_recursion_lower_is_the_source_model_and_bad_targets_are_refused() {
        let src = vanilla(4);
        let cfg =
            uptrain_config(src.config(), Sharing::Cycle, 1, Initialization::Lower, None).unwrap();
        let up = uptrain_model(&src, &cfg, 0).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 2, 33]], &Device::Cpu).unwrap();
        let opts = crate::model::ForwardOptions::eval();
        let a = src.forward(&ids, &opts).unwrap().logits;
        let b = up.forward(&ids, &opts).unwrap().logits;
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
        let mut wide = cfg.clone();
        wide.hidden_size = 32;
        let e = uptrain_model(&src, &wide, 0).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = uptrain_config(up.config(), Sharing::Cycle, 2, Initialization::Lower, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vanilla"), "{e}");
    }
}
