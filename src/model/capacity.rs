//! Capacity and top-k selection for expert-choice routing (paper §2.2.1, docs/architecture.md S3).

/// Number of tokens recursion r keeps: `k = max(1, ⌊cap · T⌋)` with T the full sequence length (docs/architecture.md S3).
pub fn top_k(capacity: f64, seq_len: usize) -> usize {
    ((capacity * seq_len as f64) as usize).clamp(1, seq_len.max(1))
}

/// Capacity during the cosine warm-up from 1.0 to `target` over `warmup` steps (official `cap_warmup_step`).
pub fn warmed_capacity(target: f64, step: usize, warmup: usize) -> f64 {
    if warmup == 0 || step >= warmup {
        return target;
    }
    let progress = step as f64 / warmup as f64;
    target + (1.0 - target) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Indices (into `scores`) of the k largest scores, in ascending index order so causal order is kept
/// (docs/architecture.md S3). Ties go to the lower index.
pub fn select_top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut chosen: Vec<usize> = order.into_iter().take(k).collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_the_official_arithmetic() {
        // Fixture README: T = 24 with capacities 1, 2/3, 1/3 gives k = 24, 16, 8.
        let caps = [1.0, 2.0 / 3.0, 1.0 / 3.0];
        let ks: Vec<usize> = caps.iter().map(|&c| top_k(c, 24)).collect();
        assert_eq!(ks, vec![24, 16, 8]);
        assert_eq!(top_k(0.01, 10), 1, "at least one token");
        assert_eq!(
            top_k(1.0 / 3.0, 1),
            1,
            "decode-length sequences keep their token"
        );
    }

    #[test]
    fn selection_is_sorted_and_hierarchical_inputs_are_respected() {
        let s = [0.1, 0.9, 0.3, 0.8, 0.05];
        assert_eq!(select_top_k(&s, 2), vec![1, 3]);
        assert_eq!(select_top_k(&s, 5), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn warmup_decays_from_one_to_target() {
        assert!((warmed_capacity(0.5, 0, 100) - 1.0).abs() < 1e-12);
        assert!((warmed_capacity(0.5, 50, 100) - 0.75).abs() < 1e-12);
        assert_eq!(warmed_capacity(0.5, 100, 100), 0.5);
        assert_eq!(warmed_capacity(0.5, 7, 0), 0.5);
    }
}
