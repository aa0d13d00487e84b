//! Attention of query rows over their own sequences' K/V caches (paper §2.2.2: each row reads the cache of the
//! layer it runs at, up to its own position), as the engine's step and pipeline call it. Decode rows run a row
//! loop; a prompt chunk of one sequence runs as matrix products.

use crate::engine::cache::LayerKv;
use crate::engine::dense::SyncPtr;
use crate::engine::kernels::{dot, num_threads, softmax_rows};

/// Attention of query rows `q` ([n, ·] with stride `q_stride`, the first H·hd of each row are the rotated queries) each over its own cache (`items[i]`: the cache and the query's
/// position; entries at positions ≤ it are visible). GQA: query head h reads key head h / (H / kv) (HF repeat_kv).
/// Returns [n, H·hd]. Rows are independent, so large batches are split across threads.
pub(crate) fn attend(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    let n = items.len();
    let mut out = crate::alloc::filled_vec(n * nh * hd);
    let runs = same_sequence_runs(items);
    if runs.iter().any(|r| r.len() >= MIN_BLOCK_ROWS) {
        for r in runs {
            let (q, o) = (
                &q[r.start * q_stride..],
                &mut out[r.start * nh * hd..r.end * nh * hd],
            );
            if r.len() >= MIN_BLOCK_ROWS {
                attend_block(q, q_stride, &items[r], o, nh, nkv, hd);
            } else {
                attend_rows(q, q_stride, &items[r], o, nh, nkv, hd);
            }
        }
        return out;
    }
    let work: usize = items.iter().map(|(c, p)| c.visible(*p)).sum::<usize>() * nh * hd;
    let threads = num_threads().clamp(1, n.max(1));
    // Below ~1 MFLOP a thread costs more than it saves.
    if threads == 1 || work < 250_000 {
        attend_rows(q, q_stride, items, &mut out, nh, nkv, hd);
        return out;
    }
    // On the engine's pool, ~4 chunks of rows per thread (rows differ in context length).
    let per = n.div_ceil(4 * threads);
    let dst = SyncPtr(out.as_mut_ptr());
    let job = |c: usize| {
        let (a, b) = (c * per, ((c + 1) * per).min(n));
        // SAFETY: rows a..b of out (nh·hd values each, inside out's n rows) are written by this chunk only, and
        // out outlives the job.
        let o = unsafe {
            std::slice::from_raw_parts_mut(dst.get().add(a * nh * hd), (b - a) * nh * hd)
        };
        attend_rows(&q[a * q_stride..], q_stride, &items[a..b], o, nh, nkv, hd);
    };
    crate::engine::pool::run(n.div_ceil(per), &job);
    out
}

/// Runs of at least this many consecutive rows of one sequence (a prompt chunk) attend as matrix products.
const MIN_BLOCK_ROWS: usize = 16;

/// Maximal runs of consecutive rows that read the same cache at increasing positions.
fn same_sequence_runs(items: &[(&LayerKv, u32)]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (c, p)) in items.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if std::ptr::eq(items[i - 1].0, *c) && items[i - 1].1 < *p => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// Rows per job of [`attend_block`]: each job computes the scores only up to the last key its last row sees.
const BLOCK_ROWS: usize = 64;

/// Attention of a run of rows of one sequence (positions increasing) over its cache as two GEMMs per query head
/// and chunk of [`BLOCK_ROWS`] rows: S = Q_h K_gᵀ · scale over the entries the chunk's last row sees, the causal part
/// of each row's softmax, then P V_g. A GEMM is an order of magnitude faster than the row loop (prefill profile,
/// docs/benchmarks.md); chunking skips most of the masked half of a prompt's scores and gives the engine's pool
/// heads × chunks jobs to balance instead of one per head.
fn attend_block(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    out: &mut [f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let (cache, n) = (items[0].0, items.len());
    let visible: Vec<usize> = items.iter().map(|(c, p)| c.visible(*p)).collect();
    let (rep, row, ow) = (nh / nkv, nkv * hd, nh * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let dst = SyncPtr(out.as_mut_ptr());
    let chunks = n.div_ceil(BLOCK_ROWS);
    let job = |j: usize| {
        let (h, c) = (j / chunks, j % chunks);
        let (r0, r1) = (c * BLOCK_ROWS, ((c + 1) * BLOCK_ROWS).min(n));
        let (g, rows, m) = (h / rep, r1 - r0, visible[r1 - 1]);
        let mut s = crate::alloc::filled_vec(rows * m);
        // SAFETY: every operand lies inside its slice: Q_h is rows r0..r1 of hd at stride q_stride from h·hd in q
        // (q holds n rows of q_stride ≥ nh·hd); K_g and V_g are m ≤ the cache's entries, rows of hd at stride
        // nkv·hd from g·hd; S is rows × m; the output is rows r0..r1 of head h (hd at stride nh·hd) in out,
        // written by this job only.
        unsafe {
            gemm::gemm(
                rows,
                m,
                hd,
                s.as_mut_ptr(),
                1,
                m as isize,
                false,
                q.as_ptr().add(r0 * q_stride + h * hd),
                1,
                q_stride as isize,
                cache.k.as_ptr().add(g * hd),
                row as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(&mut s, m, &visible[r0..r1]);
        // SAFETY: as above.
        unsafe {
            gemm::gemm(
                rows,
                hd,
                m,
                dst.get().add(r0 * ow + h * hd),
                1,
                ow as isize,
                false,
                s.as_ptr(),
                1,
                m as isize,
                cache.v.as_ptr().add(g * hd),
                1,
                row as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    crate::engine::pool::run(nh * chunks, &job);
}

fn attend_rows(
    q: &[f32],
    q_stride: usize,
    items: &[(&LayerKv, u32)],
    out: &mut [f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = nkv * hd;
    let mut scores: Vec<f32> = Vec::new();
    let all = vec![usize::MAX; nh];
    for (i, (cache, p)) in items.iter().enumerate() {
        let m = cache.visible(*p);
        let qi = &q[i * q_stride..i * q_stride + nh * hd];
        let oi = &mut out[i * nh * hd..(i + 1) * nh * hd];
        scores.clear();
        scores.resize(nh * m, 0.0);
        for j in 0..m {
            let kj = &cache.k[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                scores[h * m + j] =
                    dot(&qi[h * hd..(h + 1) * hd], &kj[g * hd..(g + 1) * hd]) * scale;
            }
        }
        softmax_rows(&mut scores, m, &all);
        for j in 0..m {
            let vj = &cache.v[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                let w = scores[h * m + j];
                let (o, v) = (&mut oi[h * hd..(h + 1) * hd], &vj[g * hd..(g + 1) * hd]);
                for (a, b) in o.iter_mut().zip(v) {
                    *a += w * b;
                }
            }
        }
    }
}
