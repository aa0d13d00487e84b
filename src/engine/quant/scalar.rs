//! Portable kernels: the same block arithmetic as the SIMD ones (integer dot per block, then the block's scales),
//! for CPUs without them. See [`super`] for the packed layout.

use super::{ActRow, WRow, BLOCK, HIGH16, MIN};

/// 8-bit weights (Q8_0; with `SPLIT`, Q6_K's one scale per 16 values): `W` weight rows against `R` activation rows.
///
/// # Safety
/// Every row of `w` and `x` must point at `w[0].nb` valid blocks.
pub(super) unsafe fn q8<const W: usize, const R: usize, const SPLIT: bool>(
    w: &[WRow; W],
    x: &[ActRow; R],
) -> [[f32; R]; W] {
    let mut acc = [[0f32; R]; W];
    for b in 0..w[0].nb {
        for (wi, acc) in w.iter().zip(&mut acc) {
            // SAFETY (caller): block b of the weight row exists.
            let q = unsafe { std::slice::from_raw_parts(wi.qs.add(b * BLOCK) as *const i8, BLOCK) };
            for (xr, acc) in x.iter().zip(acc.iter_mut()) {
                // SAFETY (caller): block b of the activation row exists.
                let (xq, xd, _) = unsafe { xr.block(b) };
                let xq = unsafe { std::slice::from_raw_parts(xq, BLOCK) };
                let dot = |lo: usize, hi: usize| -> i32 {
                    (lo..hi).map(|t| i32::from(q[t]) * i32::from(xq[t])).sum()
                };
                *acc += if SPLIT {
                    // SAFETY (caller): two scales per block.
                    let (d0, d1) = unsafe { (*wi.d.add(2 * b), *wi.d.add(2 * b + 1)) };
                    (d0 * dot(0, 16) as f32 + d1 * dot(16, 32) as f32) * xd
                } else {
                    // SAFETY (caller): one scale per block.
                    (unsafe { *wi.d.add(b) }) * xd * dot(0, BLOCK) as f32
                };
            }
        }
    }
    acc
}

/// 4-bit weights (Q4_0 with `KIND` = OFFSET8, Q5_0 with HIGH16, Q4_1 / Q4_K with MIN): `W` weight rows against
/// `R` activation rows.
///
/// # Safety
/// Every row of `w` and `x` must point at `w[0].nb` valid blocks; `m` (MIN) or `qh` (HIGH16) too.
pub(super) unsafe fn q4<const W: usize, const R: usize, const KIND: u8>(
    w: &[WRow; W],
    x: &[ActRow; R],
) -> [[f32; R]; W] {
    let mut acc = [[0f32; R]; W];
    let mut vals = [0i32; BLOCK];
    for b in 0..w[0].nb {
        for (wi, acc) in w.iter().zip(&mut acc) {
            // SAFETY (caller): block b of the weight row exists, with its scale (and minimum / high bits).
            let (q, d) = unsafe {
                (
                    std::slice::from_raw_parts(wi.qs.add(b * 16), 16),
                    *wi.d.add(b),
                )
            };
            let hi = if KIND == HIGH16 {
                unsafe { *wi.qh.add(b) }
            } else {
                0
            };
            for j in 0..16 {
                vals[j] = i32::from(q[j] & 0xF) | ((((hi >> j) & 1) << 4) as i32);
                vals[j + 16] = i32::from(q[j] >> 4) | ((((hi >> (j + 16)) & 1) << 4) as i32);
            }
            let m = match KIND {
                MIN => unsafe { *wi.m.add(b) },
                HIGH16 => -16.0 * d,
                _ => -8.0 * d,
            };
            for (xr, acc) in x.iter().zip(acc.iter_mut()) {
                // SAFETY (caller): block b of the activation row exists.
                let (xq, xd, xds) = unsafe { xr.block(b) };
                let xq = unsafe { std::slice::from_raw_parts(xq, BLOCK) };
                let dot: i32 = vals.iter().zip(xq).map(|(&v, &a)| v * i32::from(a)).sum();
                *acc += d * xd * dot as f32 + m * xds;
            }
        }
    }
    acc
}
