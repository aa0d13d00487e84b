//! One recursion step: the shared block applied to the tokens active at a depth (docs/architecture.md S3).
//!
//! The active tokens of each sequence are gathered into a packed sub-sequence (ascending original positions, padded
//! at the end to the longest row), run through the block with causal attention among themselves at their original
//! RoPE positions, and the rows of real tokens are returned in flat order. Padding sits after every real token, so a
//! plain causal mask already keeps it invisible to real tokens.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::layers::{position_mask, DecoderLayer, KeyValue, KvSource, Rope};
use crate::model::ops::{checkpointed_layer, GradSink};

/// The tokens active at one depth: for each sequence of the batch, ascending positions in `0..t`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// Sequence length T of the full batch.
    pub t: usize,
    /// Active positions of each sequence.
    pub rows: Vec<Vec<u32>>,
}

impl Subset {
    /// Every position of a [b, t] batch.
    pub fn full(b: usize, t: usize) -> Self {
        Subset {
            t,
            rows: vec![(0..t as u32).collect(); b],
        }
    }

    /// Total number of active tokens.
    pub fn count(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// Longest row.
    pub fn n_max(&self) -> usize {
        self.rows.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// True when every position of every row is active.
    pub fn is_full(&self) -> bool {
        self.rows
            .iter()
            .all(|r| r.len() == self.t && r.iter().enumerate().all(|(i, &p)| p as usize == i))
    }

    /// Flat indices `b·T + p` of the active tokens into a [B·T, ·] tensor, in row order.
    pub fn flat(&self) -> Vec<u32> {
        let t = self.t as u32;
        self.rows
            .iter()
            .enumerate()
            .flat_map(|(b, r)| r.iter().map(move |&p| b as u32 * t + p))
            .collect()
    }

    /// Gather indices [B·n_max] into the flat batch (padding repeats position 0 of the row) and the padded
    /// positions [B, n_max].
    fn padded(&self) -> (Vec<u32>, Vec<Vec<u32>>) {
        let n = self.n_max();
        let t = self.t as u32;
        let mut idx = Vec::with_capacity(self.rows.len() * n);
        let mut pos = Vec::with_capacity(self.rows.len());
        for (b, r) in self.rows.iter().enumerate() {
            let mut p = r.clone();
            p.resize(n, 0);
            idx.extend(p.iter().map(|&q| b as u32 * t + q));
            pos.push(p);
        }
        (idx, pos)
    }

    /// Indices of the real (non-padding) rows in the padded [B·n_max] layout.
    fn real_rows(&self) -> Vec<u32> {
        let n = self.n_max() as u32;
        self.rows
            .iter()
            .enumerate()
            .flat_map(|(b, r)| (0..r.len() as u32).map(move |i| b as u32 * n + i))
            .collect()
    }

    /// Keep, in each row, the entries whose flag (in this subset's flat order) is set.
    pub fn filter(&self, keep: &[bool]) -> Subset {
        let mut it = keep.iter();
        Subset {
            t: self.t,
            rows: self
                .rows
                .iter()
                .map(|r| {
                    r.iter()
                        .filter(|_| *it.next().unwrap_or(&false))
                        .copied()
                        .collect()
                })
                .collect(),
        }
    }
}

/// Where the block's layers take keys and values from.
#[derive(Clone, Copy)]
pub enum BlockKv<'a> {
    /// Each layer computes K/V of the active tokens (recursion-wise caching).
    Own,
    /// Each layer reuses full-sequence K/V (recursive KV sharing, docs/architecture.md S6).
    Shared(&'a [KeyValue]),
    /// Hybrid "†": full-sequence K/V with the active positions overwritten by fresh K/V.
    SharedUpdate(&'a [KeyValue]),
}

/// Additive causal mask [1, 1, n, n].
pub fn causal_mask(n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, n, n), device)?.to_dtype(dtype)?)
}

/// Positions tensor [B, n] (u32).
fn positions_tensor(pos: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = pos.len();
    let n = pos.first().map_or(0, Vec::len);
    let flat: Vec<u32> = pos.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, n), device)?)
}

/// Overwrite rows of full-sequence K/V [B, kv, T, hd] at the subset's positions with fresh K/V of the padded
/// subset [B, kv, n_max, hd]; differentiable in both.
fn overwrite_kv(full: &Tensor, fresh: &Tensor, subset: &Subset) -> Result<Tensor> {
    let (b, kv, t, hd) = full.dims4()?;
    let n = fresh.dim(2)?;
    let dev = full.device();
    let full_rows = full.transpose(1, 2)?.reshape((b * t, kv * hd))?;
    let fresh_rows = fresh.transpose(1, 2)?.reshape((b * n, kv * hd))?;
    let real = Tensor::from_vec(subset.real_rows(), subset.count(), dev)?;
    let global = Tensor::from_vec(subset.flat(), subset.count(), dev)?;
    let new = fresh_rows.index_select(&real, 0)?;
    let old = full_rows.index_select(&global, 0)?;
    let merged = full_rows.index_add(&global, &(new - old)?, 0)?;
    Ok(merged
        .reshape((b, t, kv, hd))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Run `layers` on the subset of `x` ([B·T, d] flat). Returns the outputs of the active tokens ([N, d], in the
/// subset's flat order) and, per layer, the K/V it attended over.
///
/// With `checkpoint`, layers run checkpointed ([`checkpointed_layer`]; their weight gradients go to the sink) and
/// their K/V are not returned (`None`): the caller passes it only when it does not keep the K/V of this block.
pub fn run_block(
    layers: &[&DecoderLayer],
    x: &Tensor,
    subset: &Subset,
    rope: &Rope,
    kv: BlockKv,
    checkpoint: Option<&Arc<GradSink>>,
) -> Result<(Tensor, Vec<Option<KeyValue>>)> {
    let dev = x.device();
    let d = x.dim(1)?;
    let b = subset.rows.len();
    let n = subset.n_max();
    let full = subset.is_full();
    let (idx, pos) = subset.padded();
    let mut h = if full {
        x.reshape((b, n, d))?
    } else {
        x.index_select(&Tensor::from_vec(idx, b * n, dev)?, 0)?
            .reshape((b, n, d))?
    };
    let (cos, sin) = rope.at(&positions_tensor(&pos, dev)?)?;
    let self_mask = causal_mask(n, dev, x.dtype())?;
    let shared_mask = match kv {
        BlockKv::Own => None,
        BlockKv::Shared(_) | BlockKv::SharedUpdate(_) if full => None,
        _ => {
            let all: Vec<Vec<u32>> = vec![(0..subset.t as u32).collect(); b];
            let valid: Vec<usize> = subset.rows.iter().map(Vec::len).collect();
            Some(position_mask(
                &pos,
                &valid,
                &all,
                &vec![subset.t; b],
                dev,
                x.dtype(),
            )?)
        }
    };
    let mut kvs = Vec::with_capacity(layers.len());
    for (j, layer) in layers.iter().enumerate() {
        let (out, used) = match (kv, checkpoint) {
            (BlockKv::Own, Some(sink)) => (
                checkpointed_layer(layer, &h, &cos, &sin, &self_mask, KvSource::Own, sink)?,
                None,
            ),
            (BlockKv::Shared(shared), Some(sink)) => {
                let mask = shared_mask.as_ref().unwrap_or(&self_mask);
                let src = KvSource::Shared(&shared[j]);
                (
                    checkpointed_layer(layer, &h, &cos, &sin, mask, src, sink)?,
                    None,
                )
            }
            (BlockKv::Own, None) => {
                let (out, kv) = layer.forward(&h, &cos, &sin, &self_mask, KvSource::Own)?;
                (out, Some(kv))
            }
            (BlockKv::Shared(shared), None) => {
                let mask = shared_mask.as_ref().unwrap_or(&self_mask);
                let (out, kv) =
                    layer.forward(&h, &cos, &sin, mask, KvSource::Shared(&shared[j]))?;
                (out, Some(kv))
            }
            // The fresh K/V are merged into the shared ones before the layer runs: not checkpointed.
            (BlockKv::SharedUpdate(shared), _) => {
                let fresh = layer.attn.key_value(&layer.attn_input(&h)?, &cos, &sin)?;
                let merged = KeyValue {
                    k: overwrite_kv(&shared[j].k, &fresh.k, subset)?,
                    v: overwrite_kv(&shared[j].v, &fresh.v, subset)?,
                };
                let mask = shared_mask.as_ref().unwrap_or(&self_mask);
                let (out, kv) = layer.forward(&h, &cos, &sin, mask, KvSource::Shared(&merged))?;
                (out, Some(kv))
            }
        };
        h = out;
        kvs.push(used);
    }
    let h = h.reshape((b * n, d))?;
    let out = if subset.count() == b * n {
        h
    } else {
        let real = Tensor::from_vec(subset.real_rows(), subset.count(), dev)?;
        h.index_select(&real, 0)?
    };
    Ok((out, kvs))
}
