//! Per-sequence KV caches (docs/architecture.md S6), with memory accounted in bytes.
//!
//! A sequence owns one [`LayerKv`] per unrolled layer. Which tokens a layer stores decides the caching scheme:
//! - vanilla and recursive models: every token, in every layer;
//! - MoR, recursion-wise caching (paper §2.2.2, Table 2 left): a layer of recursion r stores only the tokens routed to
//!   depth r, at their original positions, and attention at that depth reads only those;
//! - recursive KV sharing (`kv_sharing`, Table 2 right): only the layers that are their own
//!   [`MorModel::kv_source_layer`] store; deeper recursions read the first recursion's entries and store nothing.
//!
//! Entries are rotated keys and values in f32, row-major [len, n_kv, head_dim], appended in position order, so
//! "keys visible to a query at position p" is always a prefix of the cache.

use crate::error::{MorError, Result};
use crate::model::MorModel;

/// The cached keys and values of one unrolled layer of one sequence.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// Rotated keys, [len, n_kv·head_dim].
    pub(crate) k: Vec<f32>,
    /// Values, [len, n_kv·head_dim].
    pub(crate) v: Vec<f32>,
    /// Original sequence position of each entry (ascending).
    pub(crate) pos: Vec<u32>,
}

impl LayerKv {
    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// Positions of the cached tokens, ascending.
    pub fn positions(&self) -> &[u32] {
        &self.pos
    }

    /// Bytes held by the cached keys and values (positions are bookkeeping and not counted, as in the paper's
    /// Table 2, which compares K/V memory).
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Number of entries visible to a query at position `p` (entries at positions ≤ p form a prefix).
    pub(crate) fn visible(&self, p: u32) -> usize {
        self.pos.partition_point(|&q| q <= p)
    }

    pub(crate) fn push(&mut self, pos: u32, k: &[f32], v: &[f32]) {
        debug_assert!(self.pos.last().is_none_or(|&l| l < pos));
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        self.pos.push(pos);
    }
}

/// The KV cache of one sequence: one [`LayerKv`] per unrolled layer, plus the number of tokens consumed so far.
#[derive(Debug, Clone)]
pub struct SeqKv {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) seq_len: usize,
    /// n_kv·head_dim of the model it was made for: one cached row.
    row: usize,
}

impl SeqKv {
    /// An empty cache for `model`.
    pub fn new(model: &MorModel) -> Self {
        SeqKv {
            layers: vec![LayerKv::default(); model.layout().num_layers()],
            seq_len: 0,
            row: kv_row(model),
        }
    }

    /// An error unless this cache was made for a model of `model`'s shape (same unrolled layers and K/V width):
    /// the engine indexes its layers and rows directly.
    pub fn check_fits(&self, model: &MorModel) -> Result<()> {
        let (layers, row) = (model.layout().num_layers(), kv_row(model));
        if self.layers.len() != layers || self.row != row {
            return Err(MorError::Request(format!(
                "a KV cache for {} layers of K/V width {} used with a model of {layers} layers of width {row}",
                self.layers.len(),
                self.row
            )));
        }
        Ok(())
    }

    /// Tokens consumed so far (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The cache of unrolled layer `i`, if the model has that layer.
    pub fn layer(&self, i: usize) -> Option<&LayerKv> {
        self.layers.get(i)
    }

    /// Number of unrolled layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// K/V bytes over all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// K/V bytes of the layers in `range` (e.g. [`crate::config::Layout`]'s recursion block); layers past the
    /// model's last count as empty.
    pub fn bytes_in(&self, range: std::ops::Range<usize>) -> usize {
        self.layers
            .iter()
            .take(range.end)
            .skip(range.start)
            .map(LayerKv::bytes)
            .sum()
    }
}

/// n_kv·head_dim of `model`: the width of one cached key or value row.
fn kv_row(model: &MorModel) -> usize {
    model.layers().first().map_or(0, |l| {
        let (_, kv, hd) = l.attn.dims();
        kv * hd
    })
}

/// The unrolled layers of the recursion block of `model` (all layers for a vanilla model), the part of the cache the
/// paper's Table 2 ratios are about.
pub fn recursion_block(model: &MorModel) -> std::ops::Range<usize> {
    let l = model.layout();
    if l.base_depth == 0 {
        0..l.num_layers()
    } else {
        l.prefix..l.prefix + l.base_depth * l.num_recursion
    }
}
