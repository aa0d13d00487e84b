//! The routing decisions of paper §2.2, each written once, as plain functions over rows.
//!
//! The training forward ([`ExpertChoice::forward`](crate::model::expert_choice::ExpertChoice::forward),
//! [`TokenChoice::forward`](crate::model::token_choice::TokenChoice::forward)), the engine's synchronous step and its
//! asynchronous pipeline all decide through these functions; none of them re-implements a rule. What differs between
//! the callers is only how rows are stored (tensors for training, f32 rows in the engine).

use candle_core::Tensor;

use crate::config::Gating;
use crate::error::Result;
use crate::model::capacity::select_top_k;

/// Expert-choice top-k (paper Eq. 2.1, hierarchical filtering): `scores` holds the candidates of several sequences
/// one after the other, `lens` how many each sequence has; each sequence keeps its `k` best candidates (all of them
/// when it has fewer). Returns, per candidate, whether it was chosen.
pub fn top_k_per_sequence(
    scores: &[f32],
    lens: impl IntoIterator<Item = usize>,
    k: usize,
) -> Vec<bool> {
    let mut chosen = vec![false; scores.len()];
    let mut off = 0;
    for n in lens {
        for i in select_top_k(&scores[off..off + n], k.min(n)) {
            chosen[off + i] = true;
        }
        off += n;
    }
    chosen
}

/// The causal decode rule of expert-choice routing (docs/architecture.md, "Causal routing"): a recursion at full
/// capacity keeps every candidate; otherwise a candidate goes on iff its router probability σ(logit) is at least
/// `threshold`. Each token decides from its own hidden state only, so the rule is causal and the KV-cached engine
/// reproduces the full-sequence causal forward exactly.
pub fn causal_keep(probs: &[f32], threshold: f64, full_capacity: bool) -> Vec<bool> {
    probs
        .iter()
        .map(|&p| full_capacity || f64::from(p) >= threshold)
        .collect()
}

/// The weight a chosen row's block output is scaled by before it is added to the residual stream: the router's
/// gate g under weighted gating (paper Eq. 2.1 / 2.2), 1 under additive gating.
pub fn gate_weight(gating: Gating, g: f32) -> f32 {
    match gating {
        Gating::Weighted => g,
        Gating::Additive => 1.0,
    }
}

/// [`gate_weight`] on tensors: block outputs `h` [n, d] scaled row by row by `gates` [n] (weighted gating), or `h`
/// itself (additive gating).
pub fn apply_gate(gating: Gating, h: Tensor, gates: &Tensor) -> Result<Tensor> {
    Ok(match gating {
        Gating::Weighted => h.broadcast_mul(&gates.unsqueeze(1)?)?,
        Gating::Additive => h,
    })
}

/// Token-choice depth (paper Eq. 2.2): a token assigned expert i runs recursions 1..=i+1.
pub fn token_choice_depth(expert: u32) -> usize {
    expert as usize + 1
}

/// Token-choice exits at recursion `r` (0-based) for the rows `active` (indices into `expert`, the expert of every
/// row): the positions within `active` of the rows that finish here and of those that go on to recursion r+1.
pub fn token_choice_exits(expert: &[u32], active: &[usize], r: usize) -> (Vec<usize>, Vec<usize>) {
    (0..active.len()).partition(|&i| token_choice_depth(expert[active[i]]) == r + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_per_sequence_and_keeps_short_sequences_whole() {
        let s = [0.1, 0.9, 0.3, /* next sequence */ 0.8, 0.05];
        assert_eq!(
            top_k_per_sequence(&s, [3, 2], 2),
            vec![false, true, true, true, true]
        );
        assert_eq!(
            top_k_per_sequence(&s, [3, 2], 1),
            vec![false, true, false, true, false]
        );
    }

    #[test]
    fn causal_rule_thresholds_unless_the_recursion_keeps_everything() {
        let p = [0.2, 0.5, 0.7];
        assert_eq!(causal_keep(&p, 0.5, false), vec![false, true, true]);
        assert_eq!(causal_keep(&p, 0.5, true), vec![true, true, true]);
    }

    #[test]
    fn gating_and_token_choice_exits() {
        assert_eq!(gate_weight(Gating::Weighted, 0.25), 0.25);
        assert_eq!(gate_weight(Gating::Additive, 0.25), 1.0);
        // Rows 0..4 with experts 0, 2, 1, 0; rows 1, 2, 3 active at recursion 0.
        let experts = [0, 2, 1, 0];
        assert_eq!(
            token_choice_exits(&experts, &[1, 2, 3], 0),
            (vec![2], vec![0, 1])
        );
        assert_eq!(token_choice_exits(&experts, &[1, 2], 1), (vec![1], vec![0]));
    }
}
