//! x86-64 kernels: 256-bit vectors, one 32-value block per vector. The u8 × i8 dot of a block is `vpdpbusd`
//! (AVX-512 VNNI) or `vpmaddubsw` + `vpmaddwd` (AVX2); 4-bit values are unsigned already, and 8-bit weights use
//! the usual sign trick (|w| · sign(x, w)). Both kernel sets come from one macro, differing only in that dot.

use std::arch::x86_64::*;

use super::BLOCK;

macro_rules! kernels {
    ($name:ident, $features:literal, |$w:ident, $x:ident| $dot:expr) => {
        pub(super) mod $name {
            use std::arch::x86_64::*;

            use super::super::{ActRow, WRow, BLOCK, HIGH16, MIN};

            /// u8 × i8 dot of one block: 8 lanes of 4 products each.
            #[target_feature(enable = $features)]
            #[inline]
            fn dot($w: __m256i, $x: __m256i) -> __m256i {
                $dot
            }

            /// Prefetch the bytes that block `b` of the next tile of `W` weight rows will read, `bytes` per row and
            /// block. A tile's rows are adjacent, so this sweeps the next tile at the rate this one is read: the
            /// rows are too short (hundreds of bytes) for the hardware prefetcher to learn `W` streams in time.
            #[target_feature(enable = $features)]
            #[inline]
            fn prefetch_next_tile<const W: usize>(w: &[WRow; W], b: usize, bytes: usize) {
                let ahead = W * w[0].nb * bytes + b * W * bytes;
                let mut o = 0;
                while o < W * bytes {
                    // Only a hint: the address may lie past the matrix, so it is formed without `add`.
                    _mm_prefetch::<_MM_HINT_T0>(w[0].qs.wrapping_add(ahead + o) as *const i8);
                    o += 64;
                }
            }

            /// Sum of the 8 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
            }

            /// 8-bit weights (Q8_0; with `SPLIT`, Q6_K's scale per 16 values): `W` weight rows against `R`
            /// activation rows, each block's loads shared by the rows of the other side.
            ///
            /// # Safety
            /// The CPU has this module's features; every row of `w` and `x` points at `w[0].nb` valid blocks.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q8<const W: usize, const R: usize, const SPLIT: bool>(
                w: &[WRow; W],
                x: &[ActRow; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                for b in 0..w[0].nb {
                    prefetch_next_tile(w, b, BLOCK);
                    let mut wv = [_mm256_setzero_si256(); W];
                    let mut aw = [_mm256_setzero_si256(); W];
                    let mut dw = [_mm256_setzero_ps(); W];
                    for i in 0..W {
                        // SAFETY (caller): block b of weight row i and its scale(s) exist.
                        wv[i] =
                            unsafe { _mm256_loadu_si256(w[i].qs.add(b * BLOCK) as *const __m256i) };
                        aw[i] = _mm256_sign_epi8(wv[i], wv[i]);
                        dw[i] = if SPLIT {
                            unsafe {
                                _mm256_set_m128(
                                    _mm_set1_ps(*w[i].d.add(2 * b + 1)),
                                    _mm_set1_ps(*w[i].d.add(2 * b)),
                                )
                            }
                        } else {
                            _mm256_set1_ps(unsafe { *w[i].d.add(b) })
                        };
                    }
                    for r in 0..R {
                        // SAFETY (caller): block b of activation row r exists.
                        let (xq, xd, _) = unsafe { x[r].block(b) };
                        let xv = unsafe { _mm256_loadu_si256(xq as *const __m256i) };
                        let xd = _mm256_set1_ps(xd);
                        for i in 0..W {
                            let p = dot(aw[i], _mm256_sign_epi8(xv, wv[i]));
                            let s = _mm256_mul_ps(dw[i], xd);
                            acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i][r]);
                        }
                    }
                }
                let mut out = [[0f32; R]; W];
                for i in 0..W {
                    for r in 0..R {
                        out[i][r] = hsum(acc[i][r]);
                    }
                }
                out
            }

            /// 4-bit weights (Q4_0: `KIND` = OFFSET8; Q5_0: HIGH16; Q4_1 / Q4_K: MIN): `W` weight rows against
            /// `R` activation rows, as [`q8`].
            ///
            /// # Safety
            /// As [`q8`]; `w[i].m` (MIN) or `w[i].qh` (HIGH16) point at `nb` values too.
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn q4<const W: usize, const R: usize, const KIND: u8>(
                w: &[WRow; W],
                x: &[ActRow; R],
            ) -> [[f32; R]; W] {
                let low = _mm256_set1_epi8(0x0F);
                // For Q5_0: spread bit t of qh to byte t (byte t of the broadcast holds qh's byte t / 8).
                let spread = _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                );
                let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                // The offset / minimum terms, m · d_x · Σq_x, kept apart from the vector sums.
                let mut corr = [[0f32; R]; W];
                for b in 0..w[0].nb {
                    prefetch_next_tile(w, b, BLOCK / 2);
                    let mut wv = [_mm256_setzero_si256(); W];
                    let mut d = [0f32; W];
                    let mut m = [0f32; W];
                    for i in 0..W {
                        // SAFETY (caller): block b of weight row i and its scale / minimum / high bits exist.
                        let raw = unsafe { _mm_loadu_si128(w[i].qs.add(b * 16) as *const __m128i) };
                        wv[i] =
                            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
                        d[i] = unsafe { *w[i].d.add(b) };
                        m[i] = if KIND == MIN {
                            unsafe { *w[i].m.add(b) }
                        } else if KIND == HIGH16 {
                            let qh = unsafe { *w[i].qh.add(b) } as i32;
                            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), spread);
                            let set = _mm256_cmpeq_epi8(
                                _mm256_or_si256(bytes, others),
                                _mm256_set1_epi8(-1),
                            );
                            wv[i] = _mm256_or_si256(
                                wv[i],
                                _mm256_and_si256(set, _mm256_set1_epi8(0x10)),
                            );
                            -16.0 * d[i]
                        } else {
                            -8.0 * d[i]
                        };
                    }
                    for r in 0..R {
                        // SAFETY (caller): block b of activation row r exists.
                        let (xq, xd, xds) = unsafe { x[r].block(b) };
                        let xv = unsafe { _mm256_loadu_si256(xq as *const __m256i) };
                        for i in 0..W {
                            let p = dot(wv[i], xv);
                            let s = _mm256_set1_ps(d[i] * xd);
                            acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[i][r]);
                            corr[i][r] += m[i] * xds;
                        }
                    }
                }
                let mut out = [[0f32; R]; W];
                for i in 0..W {
                    for r in 0..R {
                        out[i][r] = hsum(acc[i][r]) + corr[i][r];
                    }
                }
                out
            }
        }
    };
}

// AVX2: no i16 saturation in vpmaddubsw, since |w| ≤ 128 and |x| ≤ 127, so a pair sums to at most 2·128·127 < 2¹⁵.
kernels!(avx2, "avx2,fma", |w, x| _mm256_madd_epi16(
    _mm256_maddubs_epi16(w, x),
    _mm256_set1_epi16(1)
));
kernels!(vnni, "avx2,fma,avx512f,avx512vl,avx512vnni", |w, x| {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
});

/// [`super::act::quantize_scalar`] with AVX2: the same rounding (to nearest, ties to even), so results do not
/// depend on the path.
///
/// # Safety
/// The CPU has AVX2; `x.len() == q.len() == BLOCK · d.len() == BLOCK · ds.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_rows_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..d.len() {
        // SAFETY (caller): block b exists in x and q.
        unsafe {
            let p = x.as_ptr().add(b * BLOCK);
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let r = v.map(|vi| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(vi, inv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01)));
            // Pack 32 i32 to i8; the 128-bit lanes interleave, which the final permute undoes.
            let p01 = _mm256_packs_epi32(r[0], r[1]);
            let p23 = _mm256_packs_epi32(r[2], r[3]);
            let bytes = _mm256_packs_epi16(p01, p23);
            let fixed =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK) as *mut __m256i, fixed);
            *d.get_unchecked_mut(b) = scale;
            *ds.get_unchecked_mut(b) = scale * s as f32;
        }
    }
}
