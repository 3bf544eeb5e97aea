//! Matrix multiplication: a register-blocked GEMM of our own at AVX2 and AVX-512 (the same bits
//! at both levels and any thread count), the `gemm` crate below AVX2.

/// A read-only strided matrix view: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    pub fn row_major(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: cols, cs: 1 }
    }
    pub fn transposed(self) -> Mat<'a> {
        Mat {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
    /// The `rows × cols` matrix row-major: in place when it already is, else copied.
    fn rows_of(self, rows: usize, cols: usize) -> std::borrow::Cow<'a, [f32]> {
        if self.cs == 1 && (self.rs == cols || rows <= 1) {
            return std::borrow::Cow::Borrowed(&self.data[..rows * cols]);
        }
        let at = |i: usize, j: usize| self.data[i * self.rs + j * self.cs];
        std::borrow::Cow::Owned((0..rows).flat_map(|i| (0..cols).map(move |j| at(i, j))).collect())
    }
}

/// `c[m×n] (row stride ldc) = (accumulate ? c : 0) + scale · a[m×k] · b[k×n]`.
/// `parallel` lets the GEMM split the work over rayon threads (leave it off when the caller
/// already parallelises over images).
///
/// At AVX2 and above this is [`matmul_rows`] (strided operands copied row-major first, a
/// temporary for `scale` or a row stride other than `n`), so every product the interpreter and
/// calibration make has the same bits on AVX2 and AVX-512 machines and a compiled `.tcv` does
/// not depend on which one compiled it; below AVX2 the `gemm` crate (its own CPU dispatch).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    if !PackedA::supported() {
        return matmul_crate(m, n, k, a, b, c, ldc, accumulate, scale, parallel);
    }
    check_operands(m, n, k, a, b, c, ldc);
    if m == 0 || n == 0 {
        return;
    }
    let (a, b) = (a.rows_of(m, k), b.rows_of(k, n));
    if ldc == n && scale == 1.0 {
        return matmul_rows(&a, m, k, n, &b, &mut c[..m * n], accumulate, parallel);
    }
    let mut t = vec![0f32; m * n];
    matmul_rows(&a, m, k, n, &b, &mut t, false, parallel);
    for (i, t) in t.chunks_exact(n).enumerate() {
        let row = &mut c[i * ldc..i * ldc + n];
        if accumulate {
            row.iter_mut().zip(t).for_each(|(o, &v)| *o += scale * v);
        } else {
            row.iter_mut().zip(t).for_each(|(o, &v)| *o = scale * v);
        }
    }
}

/// The asserts every form of [`matmul`] starts with.
fn check_operands(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &[f32], ldc: usize) {
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "matmul operands smaller than their dimensions"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "matmul output too small"
    );
}

/// [`matmul`] through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn matmul_crate(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    check_operands(m, n, k, a, b, c, ldc);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= super::PAR_WORK {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: check_operands guarantees every index the GEMM touches is inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// Weights packed once for [`matmul_packed`]: row blocks of `MR` rows, each `[k][MR]` (rows past
/// `m` are zero), so the microkernel broadcasts `MR` consecutive values per step of `k`.
pub struct PackedA {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

/// Rows of C per microkernel call (12 × 2 accumulators + 2 B vectors + 1 broadcast ≤ 32 zmm).
const MR: usize = 12;
/// Columns of C per microkernel call (two 16-lane vectors).
const NR: usize = 32;
/// Depth per pass: an `MR × KC` block of A and a `KC × NR` panel of B stay in L1.
const KC: usize = 256;
/// Columns per pass: a `KC × NC` block of B stays in L2 while every row block uses it.
const NC: usize = 512;

impl PackedA {
    /// Packs a row-major `m × k` matrix.
    pub fn new(a: &[f32], m: usize, k: usize) -> PackedA {
        assert!(a.len() >= m * k);
        let blocks = m.div_ceil(MR);
        let mut data = vec![0f32; blocks * k * MR];
        for i in 0..m {
            let (ib, r) = (i / MR, i % MR);
            for kk in 0..k {
                data[(ib * k + kk) * MR + r] = a[i * k + kk];
            }
        }
        PackedA { m, k, data }
    }

    /// Whether [`matmul_packed`] runs at this CPU's level (AVX-512F, or AVX2 and FMA; capped by
    /// `TABCONV_SIMD` as every kernel).
    pub fn supported() -> bool {
        super::Simd::detect() >= super::Simd::Avx2
    }
}

/// `c[m×n] = (accumulate ? c : 0) + a · b` with `a` packed ([`PackedA`]), `b` row-major `k × n`
/// and `c` row-major `m × n`: a register-blocked GEMM (12 × 32 tiles: one AVX-512 microkernel, or
/// four AVX2 ones of 6 × 16; `KC × NC` blocks of B kept in cache, column panels in parallel).
/// Every element is the same chain of fused multiply-adds from zero over the depth, then added to
/// `c`: the same bits at both levels and whatever the thread count. Panics unless
/// [`PackedA::supported`].
pub fn matmul_packed(a: &PackedA, n: usize, b: &[f32], c: &mut [f32], accumulate: bool, parallel: bool) {
    matmul_blocked(
        super::Simd::detect(),
        Lhs::Packed(a),
        Rhs::Rows { b, n },
        c,
        accumulate,
        parallel,
    )
}

/// [`matmul_packed`] with `a` a row-major `m × k` matrix read in place (each step broadcasts
/// from 12 rows), for a left operand computed at run time: packing it would cost a pass over
/// it on every call. Same sums, in the same order, as the packed form.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(a.len() >= m * k);
    matmul_blocked(
        super::Simd::detect(),
        Lhs::Rows { a, m, k },
        Rhs::Rows { b, n },
        c,
        accumulate,
        parallel,
    )
}

/// A constant right operand packed once for [`matmul_rows_packed_b`]: `NR`-column panels, each
/// `[k][NR]` (columns past `n` are zero), so a microkernel call reads one contiguous block
/// instead of rows `4n` bytes apart (at `n` = 256 those rows fall into 8 of L1's 64 sets and a
/// panel of B does not stay in L1 while every row block of A passes over it).
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs a row-major `k × n` matrix.
    pub fn new(b: &[f32], k: usize, n: usize) -> PackedB {
        assert!(b.len() >= k * n);
        let mut data = vec![0f32; n.div_ceil(NR) * k * NR];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            let (j0, w) = (p * NR, NR.min(n - p * NR));
            for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                row[..w].copy_from_slice(&b[kk * n + j0..kk * n + j0 + w]);
            }
        }
        PackedB { k, n, data }
    }
}

/// [`matmul_rows`] with `b` packed ([`PackedB`]): the same sums in the same order, so the same
/// bits.
pub fn matmul_rows_packed_b(a: &[f32], m: usize, b: &PackedB, c: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(a.len() >= m * b.k);
    matmul_blocked(
        super::Simd::detect(),
        Lhs::Rows { a, m, k: b.k },
        Rhs::Packed(b),
        c,
        accumulate,
        parallel,
    )
}

/// The left operand of the blocked GEMM.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Packed(&'a PackedA),
    Rows { a: &'a [f32], m: usize, k: usize },
}

/// The right operand of the blocked GEMM: row-major `k × n`, or packed.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    Rows { b: &'a [f32], n: usize },
    Packed(&'a PackedB),
}

/// The blocked GEMM with `level`'s microkernels.
fn matmul_blocked(level: super::Simd, a: Lhs, b: Rhs, c: &mut [f32], accumulate: bool, parallel: bool) {
    let (m, k) = match a {
        Lhs::Packed(p) => (p.m, p.k),
        Lhs::Rows { m, k, .. } => (m, k),
    };
    let n = match b {
        Rhs::Rows { b, n } => {
            assert!(b.len() >= k * n);
            n
        }
        Rhs::Packed(p) => {
            assert_eq!(p.k, k, "packed B's depth differs from A's");
            p.n
        }
    };
    assert!(
        level >= super::Simd::Avx2 && level.supported(),
        "the packed GEMM needs AVX-512F or AVX2 and FMA"
    );
    let avx512 = level == super::Simd::Avx512;
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let c = &mut c[..m * n];
    let par = parallel && super::team::threads() > 1 && m * n * k >= super::PAR_WORK;
    /// `c` shared by tasks that write disjoint columns.
    #[derive(Clone, Copy)]
    struct Shared(*mut f32);
    // SAFETY: tasks write disjoint column ranges of `c` (one NR-wide panel each).
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}
    let shared = Shared(c.as_mut_ptr());
    let blocks = m.div_ceil(MR);
    // Equal depth blocks of at most KC (no short last pass re-reading all of C).
    let kstep = k.div_ceil(k.div_ceil(KC));
    // One NR-wide panel of B (at column j0) stays in L1 while every row block of A uses it.
    let panel = |j0: usize, kc: usize, kb: usize, nw: usize, rows: std::ops::Range<usize>| {
        let add = accumulate || kc > 0;
        for ib in rows {
            let mr = MR.min(m - ib * MR);
            let sh = shared;
            let (bp, ldb) = match b {
                Rhs::Rows { b, n } => (&b[kc * n + j0..], n),
                Rhs::Packed(p) => (&p.data[((j0 / NR) * k + kc) * NR..], NR),
            };
            // SAFETY: `level` asserted supported; the block of `a` holds kb steps of mr rows
            // (packed: kb·MR values; rows: mr rows of k from column kc); rows
            // kc..kc+kb and columns j0..j0+nw of `b` exist (packed: kb rows of its
            // NR-wide panel from row kc); rows ib·MR.. (mr of them)
            // and columns j0..j0+nw of `c` exist and no other task writes these columns.
            unsafe {
                let cp = std::slice::from_raw_parts_mut(sh.0.add(ib * MR * n + j0), (mr - 1) * n + nw);
                let (ap, lda, packed) = match a {
                    Lhs::Packed(p) => (&p.data[(ib * k + kc) * MR..(ib * k + kc + kb) * MR], MR, true),
                    Lhs::Rows { a, .. } => (&a[ib * MR * k + kc..(ib * MR + mr - 1) * k + kc + kb], k, false),
                };
                let tile = x86_packed::Tile {
                    kb,
                    a: ap.as_ptr(),
                    lda,
                    b: bp,
                    ldb,
                    c: cp,
                    ldc: n,
                    mr,
                    nw,
                    add,
                };
                if avx512 {
                    x86_packed::micro_rows(packed, tile)
                } else {
                    x86_packed::micro_rows_avx2(packed, tile)
                }
            };
        }
    };
    // Columns j_lo..j_hi (whole panels) of the row blocks `rows`: every depth block in turn, so
    // a value's sum runs in the same order whoever computes it and however C is split.
    let columns = |j_lo: usize, j_hi: usize, rows: std::ops::Range<usize>| {
        for kc in (0..k).step_by(kstep) {
            let kb = kstep.min(k - kc);
            for jc in (j_lo..j_hi).step_by(NC) {
                let end = (jc + NC).min(j_hi);
                for j0 in (jc..end).step_by(NR) {
                    panel(j0, kc, kb, NR.min(end - j0), rows.clone());
                }
            }
        }
    };
    let panels = n.div_ceil(NR);
    if par {
        // One hand-off for the whole product, in about four tasks per thread (a thread slowed
        // by a neighbour leaves its later ones to the others): runs of panels, each through
        // every depth block (its block of A stays in cache across its panels); with fewer
        // panels than tasks, one panel each and the row blocks split as well.
        let want = 4 * super::team::threads();
        let (groups, bands) = if panels >= want {
            (want, 1)
        } else {
            (panels, want.div_ceil(panels).min(blocks))
        };
        super::team::for_each(groups * bands, |t| {
            let (g, r) = (t / bands, t % bands);
            let (p0, p1) = (g * panels / groups, (g + 1) * panels / groups);
            let rows = r * blocks / bands..(r + 1) * blocks / bands;
            columns(p0 * NR, (p1 * NR).min(n), rows);
        });
    } else {
        columns(0, n, 0..blocks);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_packed {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// One microkernel call: `kb` steps of `mr` rows of `a` (see [`micro`]) times an `nw`-wide
    /// panel of `b` (row stride `ldb`), into `c` (row stride `ldc`), added to it with `add`.
    pub(super) struct Tile<'a> {
        pub kb: usize,
        pub a: *const f32,
        pub lda: usize,
        pub b: &'a [f32],
        pub ldb: usize,
        pub c: &'a mut [f32],
        pub ldc: usize,
        pub mr: usize,
        pub nw: usize,
        pub add: bool,
    }

    /// [`micro`] with as few rows as cover `mr` (4, 8 or 12): a short last row block does not
    /// pay for 12 rows of multiply-adds.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn micro_rows(packed: bool, t: Tile) {
        match (packed, t.mr) {
            (true, 0..=4) => micro::<true, 4>(t),
            (true, 5..=8) => micro::<true, 8>(t),
            (true, _) => micro::<true, MR>(t),
            (false, 0..=4) => micro::<false, 4>(t),
            (false, 5..=8) => micro::<false, 8>(t),
            (false, _) => micro::<false, MR>(t),
        }
    }

    /// `c[i][j] (+)= Σ_kk a(i, kk) · b[kk][j]` for `i < mr ≤ R`, `j < nw`, where `a(i, kk)` is
    /// `a[kk·lda + i]` (`PACKED`, `lda` = MR) or `a[i·lda + kk]` (row-major rows, of which only
    /// the first `mr` are read: the others repeat the last, and are not stored).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro<const PACKED: bool, const R: usize>(t: Tile) {
        let Tile {
            kb,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
            mr,
            nw,
            add,
        } = t;
        debug_assert!((1..=R).contains(&mr) && R <= MR && nw <= NR);
        let m0: __mmask16 = if nw >= 16 { 0xffff } else { ((1u32 << nw) - 1) as u16 };
        let m1: __mmask16 = if nw >= 32 {
            0xffff
        } else if nw > 16 {
            ((1u32 << (nw - 16)) - 1) as u16
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let bp = b.as_ptr();
        if PACKED {
            for kk in 0..kb {
                let b0 = _mm512_maskz_loadu_ps(m0, bp.add(kk * ldb));
                let b1 = _mm512_maskz_loadu_ps(m1, bp.add(kk * ldb + 16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(kk * lda + i));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            }
        } else {
            let rows: [*const f32; R] = std::array::from_fn(|i| a.add(i.min(mr - 1) * lda));
            for kk in 0..kb {
                let b0 = _mm512_maskz_loadu_ps(m0, bp.add(kk * ldb));
                let b1 = _mm512_maskz_loadu_ps(m1, bp.add(kk * ldb + 16));
                for (row, r) in acc.iter_mut().zip(&rows) {
                    let av = _mm512_set1_ps(*r.add(kk));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            }
        }
        let cp = c.as_mut_ptr();
        for (i, row) in acc.iter().enumerate().take(mr) {
            let p = cp.add(i * ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
            _mm512_mask_storeu_ps(p, m0, v0);
            _mm512_mask_storeu_ps(p.add(16), m1, v1);
        }
    }

    /// [`micro_rows`] at AVX2: the 12 × 32 tile as up to four 6 × 16 tiles (12 accumulators,
    /// two B vectors and a broadcast: 15 of the 16 ymm registers), each element the same chain
    /// of multiply-adds as at AVX-512.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_rows_avx2(packed: bool, t: Tile) {
        let cp = t.c.as_mut_ptr();
        for r0 in (0..t.mr).step_by(6) {
            let rows = (t.mr - r0).min(6);
            // packed: row r of the block is a[kk·lda + r]; in place: a[r·lda + kk]
            let a = if packed { t.a.add(r0) } else { t.a.add(r0 * t.lda) };
            for j0 in (0..t.nw).step_by(16) {
                let q = Quarter {
                    kb: t.kb,
                    a,
                    lda: t.lda,
                    b: t.b.as_ptr().add(j0),
                    ldb: t.ldb,
                    c: cp.add(r0 * t.ldc + j0),
                    ldc: t.ldc,
                    mr: rows,
                    nw: (t.nw - j0).min(16),
                    add: t.add,
                    plain_b: t.kb > 0 && t.b.len() >= j0 + (t.kb - 1) * t.ldb + 16,
                };
                match (packed, q.nw == 16) {
                    (true, true) => quarter::<true, true>(q),
                    (true, false) => quarter::<true, false>(q),
                    (false, true) => quarter::<false, true>(q),
                    (false, false) => quarter::<false, false>(q),
                }
            }
        }
    }

    /// [`micro256`] with as few rows as cover `q.mr` (2, 4 or 6).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quarter<const PACKED: bool, const FULL: bool>(q: Quarter) {
        match q.mr {
            0..=2 => micro256::<PACKED, 2, FULL>(q),
            3..=4 => micro256::<PACKED, 4, FULL>(q),
            _ => micro256::<PACKED, 6, FULL>(q),
        }
    }

    /// One AVX2 call: at most 6 rows × 16 columns, pointers at its corner.
    struct Quarter {
        kb: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nw: usize,
        add: bool,
        /// Whole vectors of B's rows lie inside its slice (a packed panel's zero padding, or the
        /// next row): read plainly, the lanes past `nw` computed and not stored (AMD's masked
        /// loads cost several times a plain one).
        plain_b: bool,
    }

    /// Lanes `< n` of an 8-lane mask.
    #[inline(always)]
    unsafe fn lanes(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// `R ≥ mr` rows (rows past `mr` repeat the last in place, or read the packed block's zero
    /// padding, and are not stored) × `nw ≤ 16` columns; `FULL`: `nw` is 16 (plain loads).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn micro256<const PACKED: bool, const R: usize, const FULL: bool>(q: Quarter) {
        debug_assert!((1..=R).contains(&q.mr) && q.nw <= 16 && (!FULL || q.nw == 16));
        let (m0, m1) = (lanes(q.nw.min(8)), lanes(q.nw.saturating_sub(8)));
        let rows: [*const f32; R] = std::array::from_fn(|i| {
            if PACKED {
                q.a.add(i)
            } else {
                q.a.add(i.min(q.mr - 1) * q.lda)
            }
        });
        let step = if PACKED { q.lda } else { 1 };
        // the upper 8 columns exist: no masked access is made past the last column's vector
        let hi = q.nw > 8;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..q.kb {
            let bk = q.b.add(kk * q.ldb);
            let (b0, b1) = if FULL || (q.plain_b && hi) {
                (_mm256_loadu_ps(bk), _mm256_loadu_ps(bk.add(8)))
            } else if q.plain_b {
                (_mm256_loadu_ps(bk), _mm256_setzero_ps())
            } else if hi {
                (_mm256_maskload_ps(bk, m0), _mm256_maskload_ps(bk.add(8), m1))
            } else {
                (_mm256_maskload_ps(bk, m0), _mm256_setzero_ps())
            };
            for (row, r) in acc.iter_mut().zip(&rows) {
                let av = _mm256_broadcast_ss(&*r.add(kk * step));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate().take(q.mr) {
            let p = q.c.add(i * q.ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if FULL {
                if q.add {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
                }
                _mm256_storeu_ps(p, v0);
                _mm256_storeu_ps(p.add(8), v1);
                continue;
            }
            if q.add {
                v0 = _mm256_add_ps(v0, _mm256_maskload_ps(p, m0));
            }
            _mm256_maskstore_ps(p, m0, v0);
            if hi {
                if q.add {
                    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(p.add(8), m1));
                }
                _mm256_maskstore_ps(p.add(8), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms of [`matmul`] (the crate's and, at AVX2 and above, the blocked GEMM's) equal a
    /// naive product with transposed operands, `scale`, accumulation and a row stride past `n`;
    /// the blocked form gives the bits of [`matmul_rows`] on the operands copied row-major, then
    /// scaled and added: the same on every level from AVX2 up.
    #[test]
    fn matches_naive_with_transposes_and_accumulate() {
        for &(m, n, k) in &[(7, 5, 9), (1, 10, 40), (13, 33, 3), (3, 2, 1)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            // a given as its transpose (k×m row-major), or with rows of k + 2 (a view into a
            // wider matrix); b as its transpose (n×k row-major)
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let wide: Vec<f32> = (0..m * (k + 2))
                .map(|i| {
                    if i % (k + 2) < k {
                        a[i / (k + 2) * k + i % (k + 2)]
                    } else {
                        9.0
                    }
                })
                .collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            for ldc in [n, n + 3] {
                for (accumulate, scale) in [(true, 2.0), (false, 1.0), (true, 1.0), (false, -0.5)] {
                    let start: Vec<f32> = (0..m * ldc).map(|i| 1.0 + (i % 3) as f32).collect();
                    let run = |crate_form: bool| {
                        let mut c = start.clone();
                        let f = if crate_form { matmul_crate } else { matmul };
                        let a = if ldc == n {
                            Mat::row_major(&at, m).transposed()
                        } else {
                            Mat {
                                data: &wide,
                                rs: k + 2,
                                cs: 1,
                            }
                        };
                        f(
                            m,
                            n,
                            k,
                            a,
                            Mat::row_major(&bt, k).transposed(),
                            &mut c,
                            ldc,
                            accumulate,
                            scale,
                            false,
                        );
                        c
                    };
                    let blocked = run(false);
                    for (form, c) in [("crate", &run(true)), ("matmul", &blocked)] {
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j];
                                let base = start[i * ldc + j];
                                if j >= n {
                                    assert_eq!(got, base, "{form} ({m},{n},{k}) wrote past n at [{i},{j}]");
                                    continue;
                                }
                                let dot: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                                let want = if accumulate { base } else { 0.0 } + scale * dot;
                                assert!(
                                    (got - want).abs() < 1e-4,
                                    "{form} ({m},{n},{k}) ldc {ldc} [{i},{j}] {got} vs {want}"
                                );
                            }
                        }
                    }
                    if !PackedA::supported() {
                        continue;
                    }
                    let mut t = vec![0f32; m * n];
                    matmul_rows(&a, m, k, n, &b, &mut t, false, false);
                    let c = blocked;
                    for i in 0..m {
                        for j in 0..n {
                            let want = match (accumulate, scale == 1.0 && ldc == n) {
                                (false, true) => t[i * n + j],
                                (false, false) => scale * t[i * n + j],
                                (true, _) => start[i * ldc + j] + scale * t[i * n + j],
                            };
                            assert_eq!(
                                c[i * ldc + j].to_bits(),
                                want.to_bits(),
                                "({m},{n},{k}) ldc {ldc} [{i},{j}]: not the blocked GEMM's bits"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The packed GEMM equals a naive product for shapes around every block edge (the AVX2 6 × 16
    /// quarters' too: 1–13 rows, 1–33 columns), and reading the rows in place gives the same bits.
    #[test]
    fn packed_matches_naive() {
        if !PackedA::supported() {
            eprintln!("packed_matches_naive: packed GEMM not checked: this CPU has neither AVX-512F nor AVX2");
            return;
        }
        use crate::interp::kernels::Simd;
        let levels: Vec<Simd> = crate::interp::kernels::levels_checked("packed_matches_naive")
            .into_iter()
            .filter(|&l| l >= Simd::Avx2)
            .collect();
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 256),
            (13, 33, 257),
            (25, 70, 600),
            (64, 1100, 9),
            (7, 5, 3),
            (5, 9, 4),
            (3, 17, 2),
            (6, 16, 5),
            (11, 24, 7),
            // split over threads by panels and row blocks (fewer panels than tasks)
            (100, 40, 300),
            (1088, 192, 64),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
            let pa = PackedA::new(&a, m, k);
            // three threads: uneven splits of panels and row blocks
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            for accumulate in [false, true] {
                let mut serial = Vec::new();
                for parallel in [false, true] {
                    let mut c = vec![0.5f32; m * n];
                    pool.install(|| matmul_packed(&pa, n, &b, &mut c, accumulate, parallel));
                    // the same bits on one thread and on three
                    if parallel {
                        assert!(
                            c.iter()
                                .zip(&serial)
                                .all(|(x, y): (&f32, &f32)| x.to_bits() == y.to_bits()),
                            "({m},{n},{k}): three threads differ from one"
                        );
                    } else {
                        serial = c.clone();
                    }
                    // every level this CPU has gives the same bits (AVX2's quarters, AVX-512's tiles)
                    for &level in &levels {
                        let mut cl = vec![0.5f32; m * n];
                        matmul_blocked(
                            level,
                            Lhs::Packed(&pa),
                            Rhs::Rows { b: &b, n },
                            &mut cl,
                            accumulate,
                            parallel,
                        );
                        assert!(
                            c.iter().zip(&cl).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "({m},{n},{k}): {} differs from the detected level",
                            level.name()
                        );
                    }
                    // the rows read in place, with B as rows or packed: the same sums in the
                    // same order, at every level
                    let mut c2 = vec![0.5f32; m * n];
                    pool.install(|| matmul_rows(&a, m, k, n, &b, &mut c2, accumulate, parallel));
                    assert!(
                        c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "({m},{n},{k}): rows in place differ from packed rows"
                    );
                    let pb = PackedB::new(&b, k, n);
                    for &level in &levels {
                        let mut c3 = vec![0.5f32; m * n];
                        let a = Lhs::Rows { a: &a, m, k };
                        pool.install(|| matmul_blocked(level, a, Rhs::Packed(&pb), &mut c3, accumulate, parallel));
                        assert!(
                            c.iter().zip(&c3).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "({m},{n},{k}): packed B at {} differs from B as rows",
                            level.name()
                        );
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                            let want = dot + if accumulate { 0.5 } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                                "({m},{n},{k}) [{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Throughput of the packed GEMM against the `gemm` crate on conv-like shapes: a measurement
    /// that `docs/bench.sh` runs (`--release --ignored --nocapture`), not a check.
    #[test]
    #[ignore]
    fn packed_throughput() {
        if !PackedA::supported() {
            return;
        }
        for &(m, n, k) in &[
            (64usize, 3136usize, 576usize),
            (128, 1024, 1152),
            (512, 64, 4608),
            (16, 65536, 144),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut c = vec![0f32; m * n];
            let pa = PackedA::new(&a, m, k);
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..5 {
                    f();
                }
                t.elapsed().as_secs_f64() / 5.0
            };
            let tp = time(&mut || matmul_packed(&pa, n, &b, &mut c, false, false));
            let tg = time(&mut || {
                matmul_crate(
                    m,
                    n,
                    k,
                    Mat::row_major(&a, k),
                    Mat::row_major(&b, n),
                    &mut c,
                    n,
                    false,
                    1.0,
                    false,
                )
            });
            let macs = (m * n * k) as f64;
            eprintln!(
                "{m}x{n}x{k}: packed {:.1} GMAC/s, gemm crate {:.1} GMAC/s",
                macs / tp / 1e9,
                macs / tg / 1e9
            );
        }
        // a fully connected layer (activations as rows, a constant weight): B as rows or packed
        for &(m, n, k) in &[
            (64usize, 256usize, 784usize),
            (64, 10, 256),
            (1, 256, 784),
            (1088, 192, 64),
            (1088, 64, 128),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
            let pb = PackedB::new(&b, k, n);
            let mut c = vec![0f32; m * n];
            let reps = 20_000_000 / (m * n * k) + 5;
            let mut best = [f64::MAX; 2];
            for _ in 0..5 {
                for (v, best) in best.iter_mut().enumerate() {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        match v {
                            0 => matmul_rows(&a, m, k, n, &b, &mut c, false, false),
                            _ => matmul_rows_packed_b(&a, m, &pb, &mut c, false, false),
                        }
                    }
                    *best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
            }
            let macs = (m * n * k) as f64;
            // the same packed product split over two threads (the team's hand-off included)
            let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let mut best2 = f64::MAX;
            two.install(|| {
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        matmul_rows_packed_b(&a, m, &pb, &mut c, false, true);
                    }
                    best2 = best2.min(t.elapsed().as_secs_f64() / reps as f64);
                }
            });
            eprintln!(
                "{m}x{n}x{k} (A as rows): B as rows {:.1} GMAC/s, B packed {:.1} GMAC/s, B packed on 2 threads {:.1} GMAC/s (best of 5)",
                macs / best[0] / 1e9,
                macs / best[1] / 1e9,
                macs / best2 / 1e9
            );
        }
    }
}
