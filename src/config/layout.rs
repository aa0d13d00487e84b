//! Parameter-sharing strategies (paper §2.1, Table 5; official `model/sharing_strategy/llama.py`): which unrolled
//! layer uses which weights, and how the recursions of a routed model are laid out.

use serde::{Deserialize, Serialize};

/// Parameter-sharing strategy (paper §2.1, Table 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// Layer ℓ uses Φ'_{ℓ mod (L/N_r)}.
    Cycle,
    /// Layer ℓ uses Φ'_{⌊ℓ/N_r⌋}.
    Sequence,
    /// First and last layers unique; the middle cycles.
    MiddleCycle,
    /// First and last layers unique; the middle repeats each layer N_r times in a row.
    MiddleSequence,
}

/// Where each unrolled layer takes its weights from and how recursions are laid out (paper §2.1, docs/architecture.md S2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// For each unrolled layer, the index of the unrolled layer whose weights it uses (its canonical layer:
    /// the first unrolled layer with those weights). Vanilla: the identity.
    pub source: Vec<usize>,
    /// Unique (non-recursive) layers before the recursion block: 1 for Middle-*, 0 otherwise.
    pub prefix: usize,
    /// Layers per recursion (the shared block depth); 0 for vanilla.
    pub base_depth: usize,
    /// Number of recursions N_r (1 for vanilla).
    pub num_recursion: usize,
}

impl Layout {
    /// The layout of `num_layers` unrolled layers under `recursion` (docs/architecture.md S2). When N_r does not divide the layers,
    /// the remainder is dropped (the official code likewise keeps base_depth·N_r recursion layers; docs/architecture.md S2);
    /// `ModelConfig::layout_warning` says so.
    pub fn new(recursion: Option<(Sharing, usize)>, num_layers: usize) -> Layout {
        let l = num_layers;
        let Some((sharing, num_recursion)) = recursion else {
            return Layout {
                source: (0..l).collect(),
                prefix: 0,
                base_depth: 0,
                num_recursion: 1,
            };
        };
        let n = num_recursion.max(1);
        let middle = matches!(sharing, Sharing::MiddleCycle | Sharing::MiddleSequence);
        let prefix = usize::from(middle);
        let inner = l.saturating_sub(2 * prefix);
        let bd = inner / n;
        let unrolled_inner = bd * n;
        let mut source = Vec::with_capacity(unrolled_inner + 2 * prefix);
        if middle {
            source.push(0);
        }
        for j in 0..unrolled_inner {
            // Position of unique layer u within the inner block, expressed as its first unrolled index.
            let first = match sharing {
                Sharing::Cycle | Sharing::MiddleCycle => j % bd,
                Sharing::Sequence | Sharing::MiddleSequence => (j / n) * n,
            };
            source.push(prefix + first);
        }
        if middle {
            source.push(prefix + unrolled_inner);
        }
        Layout {
            source,
            prefix,
            base_depth: bd,
            num_recursion: n,
        }
    }

    /// Unrolled layer count.
    pub fn num_layers(&self) -> usize {
        self.source.len()
    }
    /// Distinct layers (the set of canonical indices), ascending.
    pub fn unique_layers(&self) -> Vec<usize> {
        let mut u: Vec<usize> = self.source.clone();
        u.sort_unstable();
        u.dedup();
        u
    }
    /// Unrolled layer indices of recursion `r` (0-based), for routed models.
    pub fn recursion_layers(&self, r: usize) -> std::ops::Range<usize> {
        let start = self.prefix + r * self.base_depth;
        start..start + self.base_depth
    }
    /// Unrolled layers after the recursion block.
    pub fn suffix_layers(&self) -> std::ops::Range<usize> {
        self.prefix + self.num_recursion * self.base_depth..self.num_layers()
    }
}

#[cfg(test)]
mod tests {
    use super::{Layout, Sharing};

    fn source(l: usize, sharing: Sharing, n_r: usize) -> Vec<usize> {
        Layout::new(Some((sharing, n_r)), l).source
    }

    #[test]
    fn layouts_match_the_official_mappings() {
        // The mappings recorded in tests/fixtures/README.md.
        assert_eq!(
            source(8, Sharing::MiddleCycle, 3),
            vec![0, 1, 2, 1, 2, 1, 2, 7]
        );
        assert_eq!(source(8, Sharing::Cycle, 2), vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(
            source(8, Sharing::Sequence, 2),
            vec![0, 0, 2, 2, 4, 4, 6, 6]
        );
        assert_eq!(
            source(8, Sharing::MiddleSequence, 3),
            vec![0, 1, 1, 1, 4, 4, 4, 7]
        );
        assert_eq!(Layout::new(None, 4).source, vec![0, 1, 2, 3]);
    }

    #[test]
    fn non_divisible_layers_drop_the_remainder() {
        // docs/architecture.md S2: the 135M model (30 layers) with N_r = 3 has 1+9+1 unique and 29 unrolled layers.
        let l = Layout::new(Some((Sharing::MiddleCycle, 3)), 30);
        assert_eq!(l.num_layers(), 29);
        assert_eq!(l.unique_layers().len(), 11);
    }
}
