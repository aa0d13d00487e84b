//! Quantized matmuls on GGUF weights as stored: `y = x · Wᵀ` with W in Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K, the
//! activations x quantized to 8 bits per 32-value block ([`QuantizedRows`]), and integer SIMD dot products per block
//! (AVX-512 VNNI or AVX2 chosen at run time, a portable fallback elsewhere), the way llama.cpp runs these formats.
//!
//! Loading repacks each GGUF block without changing a quantized value: the f16 scales become f32 (no conversion in
//! the inner loop), the 4-bit values of Q4_K are reordered into 32-value blocks like Q4_0's, and its 6-bit
//! sub-block scales and minima are multiplied out (`d·sc`, `−dmin·m`, exactly as llama.cpp's dequantization
//! computes them), so Q4_0, Q4_1 and Q4_K run one kernel. Q6_K's 6-bit values are stored as bytes (q − 32) with
//! one f32 scale per 16 values and run the 8-bit kernel. The matmul splits the weight rows into chunks for the
//! engine's [`pool`](crate::engine::pool); within a chunk, prompt rows run four activation rows per weight row and
//! decode rows four weight rows per activation row, each tile's next bytes prefetched (docs/benchmarks.md).

mod act;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use act::QuantizedRows;

use act::ActRow;
use std::sync::Arc;

use crate::engine::dense::SyncPtr;

use candle_core::quantized::GgmlDType;

/// Values per block of the packed weights and of the quantized activations.
pub const BLOCK: usize = 32;

/// A stored weight format the quantized kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 8-bit values, one f16 scale per 32.
    Q8_0,
    /// 4-bit values with offset 8, one scale per 32.
    Q4_0,
    /// 4-bit values, a scale and a minimum per 32.
    Q4_1,
    /// 5-bit values with offset 16, one scale per 32.
    Q5_0,
    /// 4-bit values in super-blocks of 256, 6-bit scales and minima per 32.
    Q4K,
    /// 6-bit values in super-blocks of 256, 8-bit scales per 16.
    Q6K,
}

impl QFormat {
    /// The format of a GGML type, or a message naming the type the quantized path cannot run.
    pub fn from_ggml(t: GgmlDType) -> Result<Self, String> {
        Ok(match t {
            GgmlDType::Q8_0 => QFormat::Q8_0,
            GgmlDType::Q4_0 => QFormat::Q4_0,
            GgmlDType::Q4_1 => QFormat::Q4_1,
            GgmlDType::Q5_0 => QFormat::Q5_0,
            GgmlDType::Q4K => QFormat::Q4K,
            GgmlDType::Q6K => QFormat::Q6K,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                return Err(format!(
                    "is {t:?}, not a quantized format (run without --quantized)"
                ))
            }
            other => {
                return Err(format!(
                    "is {other:?}, which the quantized kernels do not run \
                     (supported: Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K)"
                ))
            }
        })
    }

    /// (values, bytes) of one GGUF block.
    fn ggml_block(self) -> (usize, usize) {
        match self {
            QFormat::Q8_0 => (32, 34),
            QFormat::Q4_0 => (32, 18),
            QFormat::Q4_1 => (32, 20),
            QFormat::Q5_0 => (32, 22),
            QFormat::Q4K => (256, 144),
            QFormat::Q6K => (256, 210),
        }
    }

    /// Whether the packed values are bytes (Q8_0, Q6_K) rather than 4-bit nibbles (the rest).
    fn is_8bit(self) -> bool {
        matches!(self, QFormat::Q8_0 | QFormat::Q6K)
    }
}

impl std::fmt::Display for QFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
            QFormat::Q5_0 => "Q5_0",
            QFormat::Q4K => "Q4_K",
            QFormat::Q6K => "Q6_K",
        })
    }
}

/// A weight matrix [rows, cols] in quantized formats, repacked for the kernels (see the module docs): one part,
/// or several stacked by rows (a fused q/k/v whose parts a file stores in different formats). Parts are shared,
/// so stacking copies no block.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    /// (first row, part), in row order.
    parts: Vec<(usize, Arc<Part>)>,
}

/// Rows of one format.
#[derive(Debug)]
struct Part {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// 8-bit formats: one byte per value (i8). 4-bit formats: 16 bytes per 32-value block, byte j holding value j
    /// in its low and value j + 16 in its high nibble.
    qs: Vec<u8>,
    /// Scale per 32-value block (Q6_K: per 16 values).
    d: Vec<f32>,
    /// Q4_1, Q4_K: the minimum added per 32-value block.
    m: Vec<f32>,
    /// Q5_0: the fifth bit of each value of a block, bit j for value j.
    qh: Vec<u32>,
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

impl QMatrix {
    /// Repack `data`, a [rows, cols] tensor of GGML type `dtype` as stored in a GGUF file. Errors (one line) on a
    /// type the kernels do not run, a width that is not a whole number of blocks, or a size mismatch.
    pub fn from_ggml(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, String> {
        let part = Part::from_ggml(dtype, rows, cols, data)?;
        Ok(QMatrix {
            rows,
            cols,
            parts: vec![(0, Arc::new(part))],
        })
    }

    /// Stack matrices of the same width by rows (sharing their blocks).
    pub fn stack(mats: &[&QMatrix]) -> Result<Self, String> {
        let cols = mats.first().map_or(0, |m| m.cols);
        let mut parts = Vec::new();
        let mut rows = 0;
        for m in mats {
            if m.cols != cols {
                return Err(format!("cannot stack widths {cols} and {}", m.cols));
            }
            for (start, p) in &m.parts {
                parts.push((rows + start, Arc::clone(p)));
            }
            rows += m.rows;
        }
        Ok(QMatrix { rows, cols, parts })
    }

    /// The stored format (of the first rows, when the parts differ).
    pub fn format(&self) -> QFormat {
        self.parts[0].1.format
    }

    /// Every stored format with the bytes it holds here.
    pub fn formats(&self) -> Vec<(QFormat, usize)> {
        self.parts
            .iter()
            .map(|(_, p)| (p.format, p.bytes()))
            .collect()
    }

    /// Output features (rows of W).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of W).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held by the packed weight.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|(_, p)| p.bytes()).sum()
    }

    /// The part holding row `r`, and the row's index in it.
    fn part(&self, r: usize) -> (&Part, usize) {
        let i = self.parts.partition_point(|(s, _)| *s <= r) - 1;
        let (s, p) = &self.parts[i];
        (p, r - s)
    }

    /// Row `r` dequantized into `out` (`cols` values): the embedding lookup on a quantized table.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (p, r) = self.part(r);
        p.dequantize_row(r, out);
    }

    /// `y = x · Wᵀ` for rows `x` ([n, cols]): returns [n, rows]. Quantizes x, then runs the best kernel set of
    /// this CPU on the engine's thread pool.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_isa(Isa::detected(), &QuantizedRows::new(x, self.cols), n)
    }

    /// [`QMatrix::matmul`] on already quantized rows with a given kernel set (the tests compare every set
    /// against the dequantized reference).
    pub fn matmul_isa(&self, isa: Isa, x: &QuantizedRows, n: usize) -> Vec<f32> {
        assert_eq!(x.cols, self.cols, "activation width");
        assert_eq!(x.rows(), n, "activation rows");
        let mut y = crate::alloc::filled_vec(n * self.rows);
        let out = SyncPtr(y.as_mut_ptr());
        // ~4 chunks per thread so a descheduled worker costs a quarter of its share; at least 8 rows per chunk.
        let per = (self.rows / (4 * crate::engine::pool::threads()))
            .max(8)
            .next_multiple_of(4);
        // Chunks never straddle parts: (part, first row in it, end row in it).
        let mut chunks = Vec::new();
        for (start, p) in &self.parts {
            let mut r = 0;
            while r < p.rows {
                chunks.push((*start, &**p, r, (r + per).min(p.rows)));
                r += per;
            }
        }
        let job = |c: usize| {
            let (start, p, r0, r1) = chunks[c];
            let put = |r: usize, a: usize, v: f32| {
                // SAFETY: element (a, start + r) lies inside y ([n, rows]); chunks cover disjoint rows, so no
                // two threads write the same element, and y outlives the pool job.
                unsafe { *out.get().add(a * self.rows + start + r) = v };
            };
            let mut a = 0;
            while a < n {
                // Prompt rows: four activation rows share each weight block's load. Decode rows: four weight rows
                // share each activation block's, and their independent sums keep the FMA pipes busy.
                if n - a >= 4 {
                    p.sweep::<1, 4>(isa, x, a, r0..r1, put);
                    a += 4;
                } else {
                    p.sweep::<4, 1>(isa, x, a, r0..r1, put);
                    a += 1;
                }
            }
        };
        crate::engine::pool::run(chunks.len(), &job);
        y
    }
}

impl Part {
    fn from_ggml(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self, String> {
        let format = QFormat::from_ggml(dtype)?;
        let (bv, bb) = format.ggml_block();
        if !cols.is_multiple_of(bv) {
            return Err(format!(
                "{cols} columns are not a whole number of {dtype:?} blocks of {bv}"
            ));
        }
        let nblk = rows * cols / bv;
        if data.len() != nblk * bb {
            return Err(format!(
                "{} bytes for {rows}×{cols} {dtype:?} (expected {})",
                data.len(),
                nblk * bb
            ));
        }
        let n32 = rows * cols / BLOCK;
        let mut w = Part {
            format,
            rows,
            cols,
            qs: Vec::with_capacity(if format.is_8bit() {
                rows * cols
            } else {
                rows * cols / 2
            }),
            d: Vec::with_capacity(if format == QFormat::Q6K { 2 * n32 } else { n32 }),
            m: Vec::new(),
            qh: Vec::new(),
        };
        for b in data.chunks_exact(bb) {
            match format {
                QFormat::Q8_0 => {
                    w.d.push(f16(b, 0));
                    w.qs.extend_from_slice(&b[2..34]);
                }
                QFormat::Q4_0 => {
                    w.d.push(f16(b, 0));
                    w.qs.extend_from_slice(&b[2..18]);
                }
                QFormat::Q4_1 => {
                    w.d.push(f16(b, 0));
                    w.m.push(f16(b, 2));
                    w.qs.extend_from_slice(&b[4..20]);
                }
                QFormat::Q5_0 => {
                    w.d.push(f16(b, 0));
                    w.qh.push(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
                    w.qs.extend_from_slice(&b[6..22]);
                }
                QFormat::Q4K => {
                    let (d, dmin) = (f16(b, 0), f16(b, 2));
                    let (scales, q) = (&b[4..16], &b[16..144]);
                    for s in 0..8 {
                        let (sc, mn) = scale_min_k4(s, scales);
                        w.d.push(d * f32::from(sc));
                        w.m.push(-(dmin * f32::from(mn)));
                        // Sub-block s: the low (s even) or high nibbles of the 32 bytes of chunk s / 2.
                        let chunk = &q[(s / 2) * 32..(s / 2) * 32 + 32];
                        let v = |t: usize| {
                            if s % 2 == 0 {
                                chunk[t] & 0xF
                            } else {
                                chunk[t] >> 4
                            }
                        };
                        w.qs.extend((0..16).map(|j| v(j) | (v(j + 16) << 4)));
                    }
                }
                QFormat::Q6K => {
                    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                    let d = f16(b, 208);
                    for half in 0..2 {
                        let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                        let mut vals = [0i8; 128];
                        for l in 0..32 {
                            let h = qh[l];
                            vals[l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32;
                            vals[l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
                            vals[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                            vals[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
                        }
                        w.qs.extend(vals.iter().map(|&v| v as u8));
                        for s in 0..8 {
                            w.d.push(d * f32::from(sc[half * 8 + s] as i8));
                        }
                    }
                }
            }
        }
        Ok(w)
    }

    fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len() + self.qh.len())
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        for b in 0..nb {
            let blk = r * nb + b;
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            if self.format.is_8bit() {
                let q = &self.qs[blk * BLOCK..(blk + 1) * BLOCK];
                for (t, v) in o.iter_mut().enumerate() {
                    let d = match self.format {
                        QFormat::Q6K => self.d[2 * blk + t / 16],
                        _ => self.d[blk],
                    };
                    *v = d * f32::from(q[t] as i8);
                }
            } else {
                let q = &self.qs[blk * 16..(blk + 1) * 16];
                let d = self.d[blk];
                for t in 0..BLOCK {
                    let nib = if t < 16 { q[t] & 0xF } else { q[t - 16] >> 4 };
                    o[t] = match self.format {
                        QFormat::Q4_0 => d * (i32::from(nib) - 8) as f32,
                        QFormat::Q5_0 => {
                            let hi = ((self.qh[blk] >> t) & 1) as u8;
                            d * (i32::from(nib | (hi << 4)) - 16) as f32
                        }
                        _ => d * f32::from(nib) + self.m[blk],
                    };
                }
            }
        }
    }

    /// Weight row `r` as the kernels' pointers.
    fn wrow(&self, r: usize) -> WRow {
        let nb = self.cols / BLOCK;
        WRow {
            qs: if self.format.is_8bit() {
                self.qs[r * self.cols..].as_ptr()
            } else {
                self.qs[r * self.cols / 2..].as_ptr()
            },
            d: if self.format == QFormat::Q6K {
                self.d[2 * r * nb..].as_ptr()
            } else {
                self.d[r * nb..].as_ptr()
            },
            m: self
                .m
                .get(r * nb..)
                .map_or(std::ptr::null(), <[f32]>::as_ptr),
            qh: self
                .qh
                .get(r * nb..)
                .map_or(std::ptr::null(), <[u32]>::as_ptr),
            nb,
        }
    }

    /// `put(weight row, activation row, dot)` for weight rows `rows` against activation rows `a..a + R`, in tiles of
    /// `W` weight rows (the last ones one by one).
    fn sweep<const W: usize, const R: usize>(
        &self,
        isa: Isa,
        x: &QuantizedRows,
        a: usize,
        rows: std::ops::Range<usize>,
        put: impl Fn(usize, usize, f32),
    ) {
        assert!(
            rows.start < rows.end
                && rows.end <= self.rows
                && a + R <= x.rows()
                && x.cols == self.cols,
            "tile out of range"
        );
        let xs: [ActRow; R] = std::array::from_fn(|t| x.row(a + t));
        // Later rows' pointers follow from the first row's by the row strides, without indexing per tile.
        let first = self.wrow(rows.start);
        let row_at = |r: usize| first.offset(r - rows.start, self.format);
        let mut r = rows.start;
        while r < rows.end {
            if rows.end - r >= W {
                let v = self.dots::<W, R>(isa, &std::array::from_fn(|i| row_at(r + i)), &xs);
                for (i, vi) in v.iter().enumerate() {
                    for (t, &d) in vi.iter().enumerate() {
                        put(r + i, a + t, d);
                    }
                }
                r += W;
            } else {
                let v = self.dots::<1, R>(isa, &[row_at(r)], &xs);
                for (t, &d) in v[0].iter().enumerate() {
                    put(r, a + t, d);
                }
                r += 1;
            }
        }
    }

    /// Dots of weight rows `w` with activation rows `xs`, indexed [weight row][activation row]; the rows must lie
    /// inside this part and the activations (as [`Part::sweep`] checks).
    fn dots<const W: usize, const R: usize>(
        &self,
        isa: Isa,
        w: &[WRow; W],
        xs: &[ActRow; R],
    ) -> [[f32; R]; W] {
        macro_rules! go {
            ($module:ident) => {{
                // SAFETY: the pointers of `w` and `xs` cover `nb` blocks of rows of this part and of the
                // activations (the caller's contract, checked in `sweep`), and the kernel set's CPU features were
                // detected.
                unsafe {
                    match self.format {
                        QFormat::Q8_0 => $module::q8::<W, R, false>(w, xs),
                        QFormat::Q6K => $module::q8::<W, R, true>(w, xs),
                        QFormat::Q4_0 => $module::q4::<W, R, OFFSET8>(w, xs),
                        QFormat::Q5_0 => $module::q4::<W, R, HIGH16>(w, xs),
                        QFormat::Q4_1 | QFormat::Q4K => $module::q4::<W, R, MIN>(w, xs),
                    }
                }
            }};
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => go!(x86_vnni),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => go!(x86_avx2),
            Isa::Scalar => go!(scalar),
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{avx2 as x86_avx2, vnni as x86_vnni};

/// 4-bit kernel variants: how the value's offset is applied.
pub(super) const OFFSET8: u8 = 0;
/// Q5_0: a fifth bit from `qh`, offset 16.
pub(super) const HIGH16: u8 = 1;
/// Q4_1 / Q4_K: a per-block minimum `m`.
pub(super) const MIN: u8 = 2;

/// One weight row as raw pointers for the kernels: `nb` blocks of 32 values.
pub(super) struct WRow {
    pub qs: *const u8,
    pub d: *const f32,
    pub m: *const f32,
    pub qh: *const u32,
    pub nb: usize,
}

impl WRow {
    /// The row `k` rows after this one in a part of `format` (pointer arithmetic only; the caller keeps it in range,
    /// and `m` / `qh`, unused by formats without them, may move past their empty vectors).
    fn offset(&self, k: usize, format: QFormat) -> WRow {
        let bytes = if format.is_8bit() { BLOCK } else { BLOCK / 2 };
        let scales = if format == QFormat::Q6K { 2 } else { 1 };
        WRow {
            qs: self.qs.wrapping_add(k * self.nb * bytes),
            d: self.d.wrapping_add(k * self.nb * scales),
            m: self.m.wrapping_add(k * self.nb),
            qh: self.qh.wrapping_add(k * self.nb),
            nb: self.nb,
        }
    }
}

/// A kernel set: the instructions the integer dot products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 VNNI `vpdpbusd` on 256-bit vectors (with AVX2).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Portable scalar code.
    Scalar,
}

impl Isa {
    /// Every kernel set this CPU runs, best first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                if has!("avx512vnni") && has!("avx512vl") {
                    v.push(Isa::Avx512Vnni);
                }
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Scalar);
        v
    }

    /// The best kernel set of this CPU (detected once).
    pub fn detected() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| Isa::available()[0])
    }
}

/// The SIMD features of this CPU that matter to the engine, detected at run time (for benchmark reports).
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        macro_rules! probe {
            ($($f:tt),*) => { $( if has!($f) { v.push($f); } )* };
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avxvnni"
        );
    }
    v
}

impl ActRow {
    /// Block b's (quantized values, scale, scale × sum).
    #[inline(always)]
    pub(super) unsafe fn block(&self, b: usize) -> (*const i8, f32, f32) {
        // SAFETY (caller): b is below the row's block count.
        unsafe { (self.q.add(b * BLOCK), *self.d.add(b), *self.ds.add(b)) }
    }
}
