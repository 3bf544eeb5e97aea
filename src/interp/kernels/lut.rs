//! Lookup-accumulate kernels for product-quantized matrix multiplication.
//!
//! A PQ layer has `c` codebooks of `k` prototypes each and `m` outputs. Its tables are laid out
//! `[c][m][k]` (entry `(ci*m + mi)*k + code`), the codes of the rows `[rows][c]`, and
//! `out[r*m + mi] = Σ_ci tables[(ci*m + mi)*k + codes[r*c + ci]]`.
//!
//! The int8 kernels compute that sum exactly in integers, so every kernel gives bit-identical
//! results; the f32 kernel accumulates in codebook order, so it is deterministic too. All kernels
//! split the rows into blocks of at most [`PAR_ROWS`] processed in parallel with rayon: the result
//! never depends on the thread count.
//!
//! - `Scalar`: any `k <= 256`; blocks of 64 rows, four codebooks at a time, so the `k`-entry table
//!   rows of a `(codebook, output)` pair stay in L1 while the block looks them up, and each i32
//!   accumulator load/store serves four lookups. (The lookups themselves are gathers and stay
//!   scalar; the code check, column gather and output copy vectorize.)
//! - `Avx2` / `Avx512` (`k == 16` only): MADDNESS/Bolt style. The codes of a block of 32 (64) rows
//!   are transposed and packed two per byte (one nibble per codebook of a pair), each 16-entry
//!   table row is broadcast into every 128-bit lane and `pshufb` looks up 32 (64) rows at once;
//!   the two codebooks of a pair are added and widened into i16 accumulators by one `pmaddubsw`,
//!   flushed into i32 often enough never to overflow (proof in the `x86` module).
//! - `Vnni` (`k == 16`, AVX-512 VBMI and VNNI): the codes of 16 rows × 4 codebooks fill one
//!   register (byte `4i + j`: row `i`'s code of codebook `j` plus `16 j`) and the 16-entry tables
//!   of those 4 codebooks for one output another ([`quad_tables`]): one `vpermb` looks up 64
//!   entries and one `vpdpbusd` (ones × entries) adds each row's 4 into its i32 lane — two
//!   instructions per 64 lookups, exact, no i16 flushes. Blocks of 64 rows × 6 outputs keep 24
//!   accumulators in registers; codes are packed by 16×16 dword transposes, sums written by
//!   16×16 transposes. Measured (Zen 5, c = m = 64, one thread): 120–150 G lookups/s against
//!   85–95 G for `Avx512`.
//! - `Vnni` at `k == 64`: the codes of 32 rows × 2 codebooks fill one register (word `i`: row
//!   `i`'s two codes, the second plus 64) and the two codebooks' 64-entry tables for one output
//!   two more: one `vpermi2b` looks up 64 entries, `vpmaddubsw` (ones × entries) adds each
//!   row's two into a 16-bit lane and `vpaddw` accumulates (widened to i32 every 254
//!   codebooks). Measured with 8 outputs of one block of rows per register tile (Zen 4, one
//!   thread, `lut_throughput`, two runs): 60–64 G lookups/s at c = m = 64 like the row-wise
//!   kernel, 27–41 against 21–31 G at c = 48, m = 16; the lookups of ResNet-18/16 over
//!   3-value codebooks at batch 64 took 16–19 ms against 39 ms row-wise. Since, calls of more
//!   than one block take 4 outputs of two blocks per tile, sharing each load of the tables.
//! - `Vnni` at `k == 128`: the same pairs of codebooks, but each codebook's 128-entry table
//!   fills the two registers of a `vpermi2b`: two merge-masked `vpermi2b` per 32 rows look up
//!   the first codebook into the even bytes and the second into the odd ones, then as at 64
//!   codes. ResNet-18/16 at 128 codes, batch 64, one thread (Zen 5, the host busy, three
//!   alternated rounds): lookups 18.2–20.2 ms against 35.6–38.3 ms row-wise.
//! - `Avx512` at `k == 256`, when the CPU has AVX-512 VBMI: two merge-masked `vpermi2b` look up 64
//!   codes in a 256-entry table held in four registers, the pairs summed as above (`lut_k256.rs`).
//!   `Vnni` runs it too at `k == 256`; `Avx2` falls back to `Scalar`.
//! - Row-wise ([`lut_i8_rowwise`], [`lut_i8_rowwise_then`]), over `[c][k][m]` tables: for each row
//!   and codebook, the `m` entries its code selects are added, vectorized over outputs. It beats
//!   the kernels above for few rows at any `k`, at `k == 256` for any number of rows when
//!   `m ≥ 16`, at any other `k` but 16 (e.g. 64 without the VNNI kernel) when `m ≥ 16` (no
//!   other shuffle kernel takes it, so the alternative is `Scalar`), and at `k == 16` with `m ≥ 16` on CPUs whose best shuffle kernel is `Avx2` ([`prefer_rowwise`],
//!   measured): the interpreter's `LutMatMul` picks by that. Its loop takes output tiles outside
//!   and rows inside, so a tile's table columns stay in cache across the rows of a block.
//!
//! Codes must be `< k` (asserted: the kernels index without bounds checks).

use super::Simd;
use rayon::prelude::*;
use std::ops::Range;

/// Output columns per parallel task when a lookup call is split by outputs (a multiple of
/// the `pshufb` kernels' outputs per group and of the relaid tables' blocks; the VNNI kernel's
/// groups of 6 end with a narrower one).
const COL_TILE: usize = 64;

/// Lookups from which a call of one block of rows splits its outputs across the team.
const SPLIT_COLS_WORK: usize = 1 << 18;

/// Outputs per task when `m` outputs split across the team: [`COL_TILE`]s, two per thread,
/// where `m` holds that many; else one share per thread in multiples of 16 (every kernel's
/// output groups divide 16).
fn col_tile(m: usize) -> usize {
    let threads = super::team::threads().max(1);
    let tile = m.div_ceil(2 * threads);
    if tile >= COL_TILE {
        tile.next_multiple_of(COL_TILE)
    } else {
        m.div_ceil(threads).next_multiple_of(16)
    }
}

/// Rows per parallel task (fixed, so that results and scheduling do not depend on thread count).
const PAR_ROWS: usize = 256;
/// Rows per block of the scalar kernels: `m` accumulators of this many rows stay in L1.
const SCALAR_ROWS: usize = 64;
/// Calls with at least this many rows copy the tables into the SIMD kernels' layout first.
#[cfg(target_arch = "x86_64")]
const RELAYOUT_MIN_ROWS: usize = 512;

/// Which implementation of the int8 lookup-accumulate to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LutKernel {
    /// Portable code, any `k <= 256`.
    Scalar,
    /// AVX2 `vpshufb`, 32 rows per block, `k == 16`.
    Avx2,
    /// AVX-512BW `vpshufb`, 64 rows per block, `k == 16`; with AVX-512 VBMI also `k == 256`
    /// (`vpermi2b`).
    Avx512,
    /// AVX-512 VBMI + VNNI, `k == 16`: `vpermb` looks up 16 rows × 4 codebooks in one
    /// 64-entry register (the 4 codebooks' tables of one output) and `vpdpbusd` adds the 4
    /// codebooks of each row straight into i32; `k == 64`: `vpermi2b` looks up 32 rows × 2
    /// codebooks in their 128 entries, `vpmaddubsw` adds each row's two; `k == 128`: two
    /// merge-masked `vpermi2b`, one per codebook; `k == 256` as [`LutKernel::Avx512`].
    Vnni,
}

impl LutKernel {
    /// Best available on this CPU (runtime detection; `Scalar` on other architectures).
    pub fn detect() -> LutKernel {
        if LutKernel::Vnni.supported() && Simd::cap() == Simd::Avx512 {
            LutKernel::Vnni
        } else if LutKernel::Avx512.supported() && Simd::cap() == Simd::Avx512 {
            LutKernel::Avx512
        } else if LutKernel::Avx2.supported() && Simd::cap() >= Simd::Avx2 {
            LutKernel::Avx2
        } else {
            LutKernel::Scalar
        }
    }

    /// All kernels usable on this CPU (for tests and benchmarks), slowest first.
    pub fn available() -> Vec<LutKernel> {
        [LutKernel::Scalar, LutKernel::Avx2, LutKernel::Avx512, LutKernel::Vnni]
            .into_iter()
            .filter(|k| k.supported())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            LutKernel::Scalar => "scalar",
            LutKernel::Avx2 => "avx2",
            LutKernel::Avx512 => "avx512",
            LutKernel::Vnni => "avx512vnni",
        }
    }

    fn supported(self) -> bool {
        match self {
            LutKernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            LutKernel::Avx2 => Simd::Avx2.supported(),
            #[cfg(target_arch = "x86_64")]
            LutKernel::Avx512 => Simd::Avx512.supported() && std::arch::is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "x86_64")]
            LutKernel::Vnni => {
                LutKernel::Avx512.supported() && vbmi_supported() && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Whether the CPU has AVX-512 VBMI (`vpermi2b`), which the `k == 256` kernel needs besides
/// [`LutKernel::Avx512`]'s AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
fn vbmi_supported() -> bool {
    std::arch::is_x86_feature_detected!("avx512vbmi")
}

/// Asserts the slice lengths of a lookup-accumulate call.
fn check_shapes(codes: usize, rows: usize, c: usize, tables: usize, m: usize, k: usize, out: usize) {
    assert!((1..=256).contains(&k), "lut: k = {k} must be in 1..=256");
    assert_eq!(Some(codes), rows.checked_mul(c), "lut: codes.len() != rows*c");
    assert_eq!(
        Some(tables),
        c.checked_mul(m).and_then(|x| x.checked_mul(k)),
        "lut: tables.len() != c*m*k"
    );
    assert_eq!(Some(out), rows.checked_mul(m), "lut: out.len() != rows*m");
}

/// Asserts every code is `< k`: the kernels index the tables without bounds checks.
fn check_codes(codes: &[u8], k: usize) {
    if k < 256 {
        // a max-reduction (vectorizes) rather than an early-exit `all`.
        let max = codes.iter().fold(0u8, |a, &b| a.max(b));
        assert!((max as usize) < k, "lut: code {max} out of range for k = {k}");
    }
}

/// int8 tables → exact i32 sums with the best kernel of this CPU ([`LutKernel::detect`]).
pub fn lut_i8(codes: &[u8], rows: usize, c: usize, tables: &[i8], m: usize, k: usize, out: &mut [i32]) {
    lut_i8_with(LutKernel::detect(), codes, rows, c, tables, m, k, out)
}

/// int8 tables → exact i32 sums with an explicit kernel. The SIMD kernels need `k == 16` (and
/// `Vnni` also `k == 64` and `128`, `Avx512` with VBMI `k == 256`); for any other `k` they fall
/// back to `Scalar`. Panics if `kernel` is not supported by this CPU (pick it
/// from [`LutKernel::available`]) or a code is `>= k`.
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_with(
    kernel: LutKernel,
    codes: &[u8],
    rows: usize,
    c: usize,
    tables: &[i8],
    m: usize,
    k: usize,
    out: &mut [i32],
) {
    check_shapes(codes.len(), rows, c, tables.len(), m, k, out.len());
    let Some(call) = Call::new(kernel, rows, c, tables, None, m, k) else {
        out.fill(0);
        return;
    };
    super::team::for_chunks(out, call.par_rows * m, |bi, out| {
        TASK.with_borrow_mut(|(scratch, _)| call.block(codes, bi, out, scratch))
    });
}

/// [`lut_i8`] with an epilogue: each block of rows' i32 sums is handed, while in cache, to
/// `epilogue(first_row, sums, out)`, which writes that block's `out` (every value). No `rows × m`
/// array of sums is built. `out` may be uninitialised. `quads`: the tables' [`quad_tables`]
/// when the caller keeps them (else the VNNI kernel builds them for this call).
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_then<T: Send>(
    codes: &[u8],
    rows: usize,
    c: usize,
    tables: &[i8],
    quads: Option<&[i8]>,
    m: usize,
    k: usize,
    out: &mut [T],
    epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    check_shapes(codes.len(), rows, c, tables.len(), m, k, out.len());
    match Call::new(LutKernel::detect(), rows, c, tables, quads, m, k) {
        Some(call) => then_with(&call, codes, rows, out, epilogue),
        None if !out.is_empty() => epilogue(0, &vec![0; out.len()], out),
        None => {}
    }
}

/// [`lut_i8_then`] with its call made.
fn then_with<T: Send>(
    call: &Call,
    codes: &[u8],
    rows: usize,
    out: &mut [T],
    epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    let m = call.m;
    if call.split_cols(rows) {
        // Split the outputs instead of the rows: every task reads only its part of the tables,
        // once for all rows. Exact integer sums: the same result.
        let tile = col_tile(m);
        let mut sums = vec![0i32; rows * m];
        col_tiles(rows, m, tile, &mut sums, |cols, res| {
            TASK.with_borrow_mut(|(scratch, _)| call.block_cols(codes, 0, cols, res, scratch))
        });
        epilogue(0, &sums, out);
        return;
    }
    call.each_block(rows, out, |bi, out| {
        TASK.with_borrow_mut(|(scratch, sums)| {
            sums.resize(out.len(), 0);
            call.block(codes, bi, sums, scratch);
            epilogue(bi * call.par_rows, sums, out);
        })
    });
}

/// The affine epilogue of a lookup layer: output `j` of row `i` is
/// `act(scale[j] · sum + offset[j] + residual[i·m + j])` (the residual when given), with
/// `act` ReLU (`y > 0 ? y : +0`, NaN to 0) or nothing; each operation rounded separately, in
/// this order, on every path and SIMD level.
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    pub scale: &'a [f32],
    pub offset: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl Affine<'_> {
    /// Output `j` of row `i` from its sum.
    #[inline(always)]
    pub fn one(&self, i: usize, j: usize, sum: f32) -> f32 {
        let m = self.scale.len();
        let mut y = self.scale[j] * sum + self.offset[j];
        if let Some(r) = self.residual {
            y += r[i * m + j];
        }
        match self.relu {
            true => super::relu(y),
            false => y,
        }
    }

    /// Rows `r0 ..` of sums → their outputs, every value of `out` written (it may be
    /// uninitialised): [`Affine::one`] in one pass per row, compiled for the widest SIMD level
    /// (the same separately rounded multiply and adds on every level: the compiler does not
    /// fuse them).
    pub fn apply<S: LutSum>(&self, r0: usize, sums: &[S], out: &mut [std::mem::MaybeUninit<f32>]) {
        super::encode::dispatch_simd!(self.apply_at(r0, sums, out))
    }

    #[inline(always)]
    fn apply_at<S: LutSum>(&self, r0: usize, sums: &[S], out: &mut [std::mem::MaybeUninit<f32>]) {
        let m = self.scale.len().max(1);
        #[inline(always)]
        fn row<S: LutSum>(
            yr: &mut [std::mem::MaybeUninit<f32>],
            ar: &[S],
            (scale, offset): (&[f32], &[f32]),
            residual: Option<&[f32]>,
            relu: bool,
        ) {
            assert_eq!(yr.len(), ar.len(), "one sum per output");
            let (scale, offset) = (&scale[..yr.len()], &offset[..yr.len()]);
            let act = |y: f32| if relu { super::relu(y) } else { y };
            match residual {
                Some(r) => {
                    let r = &r[..yr.len()];
                    for i in 0..yr.len() {
                        yr[i].write(act(scale[i] * ar[i].to_f32() + offset[i] + r[i]));
                    }
                }
                None => {
                    for i in 0..yr.len() {
                        yr[i].write(act(scale[i] * ar[i].to_f32() + offset[i]));
                    }
                }
            }
        }
        for (ri, (yr, ar)) in out.chunks_mut(m).zip(sums.chunks(m)).enumerate() {
            let base = (r0 + ri) * m;
            let residual = self.residual.map(|r| &r[base..base + yr.len()]);
            match self.relu {
                true => row(yr, ar, (self.scale, self.offset), residual, true),
                false => row(yr, ar, (self.scale, self.offset), residual, false),
            }
        }
    }
}

/// What a lookup kernel sums into: i32 (int8 tables) or f32.
pub trait LutSum: Copy {
    fn to_f32(self) -> f32;
}
impl LutSum for i32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
impl LutSum for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// [`lut_i8_then`] with `affine` as its epilogue, writing every output: the VNNI kernel applies
/// it to its sums while it transposes them into rows, with no `rows × m` array of i32 sums
/// written and read back (on ResNet-18/16 at batch 1 storing the sums and the epilogue's pass
/// over them took a quarter of the time); the other kernels hand each block of sums to
/// [`Affine::apply`].
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_affine(
    codes: &[u8],
    rows: usize,
    c: usize,
    tables: &[i8],
    quads: Option<&[i8]>,
    m: usize,
    k: usize,
    affine: Affine,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    check_shapes(codes.len(), rows, c, tables.len(), m, k, out.len());
    assert!(
        affine.scale.len() == m && affine.offset.len() == m,
        "lut: one scale and offset per output"
    );
    assert!(
        affine.residual.is_none_or(|r| r.len() == rows * m),
        "lut: the residual is not rows × m"
    );
    let epilogue = |r0: usize, sums: &[i32], out: &mut [std::mem::MaybeUninit<f32>]| affine.apply(r0, sums, out);
    let Some(call) = Call::new(LutKernel::detect(), rows, c, tables, quads, m, k) else {
        if !out.is_empty() {
            epilogue(0, &vec![0; out.len()], out);
        }
        return;
    };
    #[cfg(target_arch = "x86_64")]
    if call.kernel == LutKernel::Vnni && !call.split_cols(rows) {
        call.each_block(rows, out, |bi, out| {
            TASK.with_borrow_mut(|(scratch, _)| {
                let quads = call.quads.as_deref().expect("built for the VNNI kernel");
                let r0 = bi * call.par_rows;
                let nr = out.len() / m;
                // SAFETY: `Call::new` asserted `kernel.supported()` (AVX2, AVX-512F/BW, VBMI,
                // VNNI); the shapes were checked above.
                unsafe {
                    x86::vnni_affine(
                        &codes[r0 * c..(r0 + nr) * c],
                        nr,
                        c,
                        quads,
                        m,
                        k,
                        affine,
                        r0,
                        out,
                        scratch,
                    )
                }
            })
        });
        return;
    }
    then_with(&call, codes, rows, out, epilogue)
}

/// One lookup call's kernel, tables and split into parallel blocks of rows.
struct Call<'a> {
    kernel: LutKernel,
    c: usize,
    m: usize,
    k: usize,
    tables: &'a [i8],
    #[cfg(target_arch = "x86_64")]
    relaid: Option<Vec<i8>>,
    /// The [`quad_tables`] of the VNNI kernel (given by the caller, or built for this call).
    #[cfg(target_arch = "x86_64")]
    quads: Option<std::borrow::Cow<'a, [i8]>>,
    par_rows: usize,
}

impl<'a> Call<'a> {
    /// `None` when there is nothing to sum (no outputs or no codebooks: every sum is 0).
    fn new(
        kernel: LutKernel,
        rows: usize,
        c: usize,
        tables: &'a [i8],
        quads: Option<&'a [i8]>,
        m: usize,
        k: usize,
    ) -> Option<Call<'a>> {
        assert!(
            kernel.supported(),
            "lut: kernel {} is not supported by this CPU",
            kernel.name()
        );
        // |sum| <= 128·c must fit an i32.
        assert!(c <= (i32::MAX / 128) as usize, "lut: too many codebooks ({c})");
        if rows * m == 0 || c == 0 {
            return None;
        }
        let kernel = match k {
            16 => kernel,
            #[cfg(target_arch = "x86_64")]
            64 | 128 if kernel == LutKernel::Vnni => kernel,
            #[cfg(target_arch = "x86_64")]
            256 if kernel == LutKernel::Vnni => LutKernel::Avx512,
            #[cfg(target_arch = "x86_64")]
            256 if kernel == LutKernel::Avx512 && vbmi_supported() => kernel,
            _ => LutKernel::Scalar,
        };
        #[cfg(target_arch = "x86_64")]
        let quads = (kernel == LutKernel::Vnni).then(|| match quads {
            Some(q) => {
                assert_eq!(q.len(), vnni_tables_len(c, m, k), "lut: quad tables do not fit");
                std::borrow::Cow::Borrowed(q)
            }
            None => std::borrow::Cow::Owned(quad_tables(tables, c, m, k)),
        });
        #[cfg(not(target_arch = "x86_64"))]
        let _ = quads;
        // When m is a multiple of 256, the table rows of one output for successive codebooks are
        // a multiple of 4 KiB apart and all map to the same L1 sets (measured: AVX2 at m = 256 ran
        // ~30% slower than at m = 240). Large such calls first copy the tables into a blocked
        // layout (c·m·16 bytes, at most 16/RELAYOUT_MIN_ROWS bytes per lookup); elsewhere the
        // copy measured no gain.
        #[cfg(target_arch = "x86_64")]
        let relaid = (matches!(kernel, LutKernel::Avx2 | LutKernel::Avx512)
            && k == 16
            && rows >= RELAYOUT_MIN_ROWS
            && m.is_multiple_of(256))
        .then(|| x86::relayout(tables, c, m));
        // Blocks of PAR_ROWS rows, or fewer (a multiple of 64, the widest kernel's block) when
        // that leaves a thread idle. Integer sums: the split never changes the result.
        let threads = super::team::threads().max(1);
        let par_rows = rows.div_ceil(2 * threads).next_multiple_of(64).clamp(64, PAR_ROWS);
        Some(Call {
            kernel,
            c,
            m,
            k,
            tables,
            #[cfg(target_arch = "x86_64")]
            relaid,
            #[cfg(target_arch = "x86_64")]
            quads,
            par_rows,
        })
    }

    /// `task(bi, out)` for every block `bi` of rows (`out`: its outputs), on the team when the
    /// call is worth a hand-off, else in order on this thread.
    fn each_block<T: Send>(&self, rows: usize, out: &mut [T], task: impl Fn(usize, &mut [T]) + Sync) {
        let chunk = self.par_rows * self.m;
        if rows * self.c * self.m < super::PAR_WORK {
            // too little to hand over
            out.chunks_mut(chunk).enumerate().for_each(|(bi, out)| task(bi, out));
        } else {
            super::team::for_chunks(out, chunk, task);
        }
    }

    /// The sums of block `bi` of rows into `out` (`rows_in_block × m`, every value written).
    fn block(&self, codes: &[u8], bi: usize, out: &mut [i32], scratch: &mut Scratch) {
        self.block_cols(codes, bi, 0..self.m, out, scratch)
    }

    /// Whether [`Call::block_cols`] takes column ranges other than all outputs (the SIMD
    /// kernels at 16, 64 and 128 codes; ranges start at multiples of 16).
    fn takes_col_ranges(&self) -> bool {
        self.kernel != LutKernel::Scalar && matches!(self.k, 16 | 64 | 128)
    }

    /// Whether `rows` rows are better split across threads by outputs than by rows: with more
    /// than one thread and a single block of rows (the other threads would idle; measured on
    /// ResNet-18's 1×1 `layer4` at batch 64: 0.30 → 0.22 ms on 2 threads). (Splitting larger
    /// calls whose tables exceed L2 by outputs too measured no gain.)
    fn split_cols(&self, rows: usize) -> bool {
        let (c, m) = (self.c, self.m);
        super::team::threads() > 1
            && self.takes_col_ranges()
            && col_tile(m) < m
            && rows * c * m >= SPLIT_COLS_WORK
            && rows <= self.par_rows
    }

    /// The sums of outputs `cols` of block `bi` of rows into `out` (`rows_in_block ×
    /// cols.len()`, every value written); `cols` is every output unless [`Call::takes_col_ranges`].
    fn block_cols(&self, codes: &[u8], bi: usize, cols: Range<usize>, out: &mut [i32], scratch: &mut Scratch) {
        let (c, m) = (self.c, self.m);
        assert!(cols == (0..m) || (self.takes_col_ranges() && cols.start.is_multiple_of(16) && cols.end <= m));
        let r0 = bi * self.par_rows;
        let nr = out.len() / cols.len();
        let codes = &codes[r0 * c..(r0 + nr) * c];
        #[cfg(target_arch = "x86_64")]
        let simd_tables = x86::Tables {
            data: self.relaid.as_deref().unwrap_or(self.tables),
            relaid: self.relaid.is_some(),
        };
        match self.kernel {
            LutKernel::Scalar => scalar_i8(codes, nr, c, self.tables, m, self.k, out, scratch),
            #[cfg(target_arch = "x86_64")]
            LutKernel::Avx2 => {
                // SAFETY: `Call::new` asserted `kernel.supported()`: the CPU has AVX2.
                unsafe { x86::avx2_i8(codes, nr, c, simd_tables, m, cols, out, scratch) }
            }
            #[cfg(target_arch = "x86_64")]
            LutKernel::Avx512 if self.k == 256 => {
                // SAFETY: `Call::new` picks this kernel for k == 256 only with VBMI (and
                // `kernel.supported()`: AVX2, AVX-512F/BW); check_codes: any byte is < 256.
                let s = scratch;
                unsafe {
                    k256::vbmi_i8(
                        codes,
                        nr,
                        c,
                        self.tables,
                        m,
                        out,
                        &mut s.packed,
                        &mut s.masks,
                        &mut s.acc,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            LutKernel::Avx512 => {
                // SAFETY: `Call::new` asserted `kernel.supported()`: AVX2 and AVX-512F/BW.
                unsafe { x86::avx512_i8(codes, nr, c, simd_tables, m, cols, out, scratch) }
            }
            #[cfg(target_arch = "x86_64")]
            LutKernel::Vnni => {
                let quads = self.quads.as_deref().expect("built for the VNNI kernel");
                // SAFETY: `Call::new` asserted `kernel.supported()`: AVX2, AVX-512F/BW, VBMI
                // and VNNI.
                unsafe { x86::vnni_i8(codes, nr, c, quads, m, self.k, cols, out, scratch) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("SIMD kernels are x86_64 only"),
        }
    }
}

/// `[c][m][k]` tables → the VNNI kernel's layout. At 16 codes `[⌈c/4⌉][m][4][16]`: the tables
/// of four consecutive codebooks of one output side by side, one 64-byte `vpermb` register. At
/// 64 codes `[⌈c/2⌉][m][2][64]`: two codebooks' tables, the 128 entries one `vpermi2b` reads;
/// at 128 codes `[⌈c/2⌉][m][2][128]`, one `vpermi2b`'s entries per codebook. Codebooks past
/// `c`: zeros.
pub fn quad_tables(tables: &[i8], c: usize, m: usize, k: usize) -> Vec<i8> {
    assert!(matches!(k, 16 | 64 | 128), "VNNI tables of {k} codes");
    assert_eq!(Some(tables.len()), c.checked_mul(m).and_then(|x| x.checked_mul(k)));
    let per = vnni_group(k);
    let mut q = vec![0i8; vnni_tables_len(c, m, k)];
    for ci in 0..c {
        let (g, j) = (ci / per, ci % per);
        for mi in 0..m {
            q[(g * m + mi) * per * k + k * j..][..k].copy_from_slice(&tables[(ci * m + mi) * k..][..k]);
        }
    }
    q
}

/// Codebooks whose tables one shuffle of the VNNI kernel reads: 4 at 16 codes (`vpermb`), 2 at
/// 64 (`vpermi2b`); at 128 the two codebooks a pair of merge-masked `vpermi2b` reads.
fn vnni_group(k: usize) -> usize {
    if k == 16 {
        4
    } else {
        2
    }
}

/// Length of [`quad_tables`]' result.
fn vnni_tables_len(c: usize, m: usize, k: usize) -> usize {
    c.div_ceil(vnni_group(k)) * vnni_group(k) * m * k
}

/// Whether [`lut_i8_then`] at `k` runs the VNNI kernel, which reads [`quad_tables`].
pub fn wants_quads(k: usize) -> bool {
    matches!(k, 16 | 64 | 128) && LutKernel::detect() == LutKernel::Vnni
}

/// `[c][m][k]` tables → `[c][k][m]`, each entry stored as `entry + 128` (`u8`): the layout of
/// [`lut_i8_rowwise`] (one contiguous run of `m` entries per (codebook, code)). Unsigned entries
/// let the AVX2 kernel add pairs of them as 16-bit words without widening each byte.
pub fn transpose_tables(tables: &[i8], c: usize, m: usize, k: usize) -> Vec<u8> {
    assert_eq!(Some(tables.len()), c.checked_mul(m).and_then(|x| x.checked_mul(k)));
    let mut t = vec![0u8; tables.len()];
    for ci in 0..c {
        for mi in 0..m {
            for kk in 0..k {
                t[(ci * k + kk) * m + mi] = (tables[(ci * m + mi) * k + kk] as u8) ^ 0x80;
            }
        }
    }
    t
}

/// Rows below which [`lut_i8_rowwise`] beats the shuffle kernels: those fill whole 32/64-row
/// blocks and read every table entry per block, while this reads only the `m` entries each code
/// selects.
pub const ROWWISE_MAX_ROWS: usize = 32;

/// int8 lookup-accumulate for few rows, any `k`: for each row and codebook, add the `m`
/// contiguous entries its code selects from `[c][k][m]` tables (from [`transpose_tables`],
/// biased by 128) into 16-bit accumulators (at most 256 codebooks between flushes to i32:
/// Σ ≤ 256·255 fits a u16; the bias is taken off at the flush), vectorized over outputs.
/// Exact integer sums, so the result equals [`lut_i8`]'s bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_rowwise(codes: &[u8], rows: usize, c: usize, tables_ckm: &[u8], m: usize, k: usize, out: &mut [i32]) {
    lut_i8_rowwise_at(Simd::detect(), codes, rows, c, tables_ckm, m, k, out)
}

/// [`lut_i8_rowwise`] at a given SIMD level (every level gives the same sums; tests compare).
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_rowwise_at(
    level: Simd,
    codes: &[u8],
    rows: usize,
    c: usize,
    tables_ckm: &[u8],
    m: usize,
    k: usize,
    out: &mut [i32],
) {
    check_shapes(codes.len(), rows, c, tables_ckm.len(), m, k, out.len());
    check_codes(codes, k);
    if out.is_empty() {
        return;
    }
    // Split the outputs, not the rows, across threads when there is enough work.
    let tile = if rows * c * m >= SPLIT_COLS_WORK && super::team::threads() > 1 {
        // whole 128-output register tiles where there are two of them
        if m >= 256 {
            128
        } else {
            col_tile(m).min(m)
        }
    } else {
        m
    };
    if tile == m {
        rowwise_tile(level, codes, c, tables_ckm, m, k, 0, m, out);
        return;
    }
    col_tiles(rows, m, tile, out, |cols, res| {
        rowwise_tile(level, codes, c, tables_ckm, m, k, cols.start, cols.len(), res)
    });
}

/// The sums of `rows` rows by column tiles of `tile` outputs in parallel: `f(cols, res)` writes
/// outputs `cols` of every row into `res` (`rows × cols.len()`), then each tile is copied into
/// `out` (`rows × m`).
fn col_tiles(rows: usize, m: usize, tile: usize, out: &mut [i32], f: impl Fn(Range<usize>, &mut [i32]) + Sync) {
    if rows == 0 || m == 0 {
        return;
    }
    let mut tiles: Vec<Vec<i32>> = vec![Vec::new(); m.div_ceil(tile)];
    super::team::for_chunks(&mut tiles, 1, |ti, res| {
        let cols = ti * tile..((ti + 1) * tile).min(m);
        res[0] = vec![0i32; rows * cols.len()];
        f(cols, &mut res[0]);
    });
    for (ti, res) in tiles.iter().enumerate() {
        let (m0, mw) = (ti * tile, res.len() / rows);
        for (o, r) in out.chunks_exact_mut(m).zip(res.chunks_exact(mw)) {
            o[m0..m0 + mw].copy_from_slice(r);
        }
    }
}

/// Rows per parallel task of [`lut_i8_rowwise_then`].
const ROWWISE_PAR_ROWS: usize = 64;

/// Whether [`lut_i8_rowwise_then`] (over `[c][k][m]` tables) is the faster kernel for `rows`
/// rows of `k`-entry tables and `m` outputs:
/// - for few rows (≤ [`ROWWISE_MAX_ROWS`]) at any `k`;
/// - for `k = 256` at any number of rows when `m ≥ 16` (or without the VBMI kernel). There each
///   lookup of the VBMI kernel costs half a `vpermi2b` and the tables are read whole per block
///   of rows, while the row-wise kernel adds 32 (AVX-512) or 16 (AVX2) selected entries per
///   load: measured on Zen 5 (`lut_throughput`, c = 64, m = 64, one thread) 77 G lookups/s
///   row-wise at AVX-512 and 57 G at AVX2 against 36 G for the VBMI kernel and 5 G for the
///   scalar one. Below 16 outputs the row-wise kernel is scalar (2 G at m = 8) and the VBMI
///   kernel wins (12 G);
/// - for any other `k` but 16 (e.g. `lut.k = 64`: 64 codes, the tree encoder of depth 6) when
///   `m ≥ 16` (no other shuffle kernel takes it), except `k = 64` and `128` on a CPU with the
///   VNNI kernel. The scalar kernel gathers every entry: measured on Zen 4 (`lut_throughput`,
///   c = m = 64, one thread) at `k = 64`: 64 G lookups/s row-wise at AVX-512 and 61 G at AVX2 against 3.3 G for the scalar kernel (at `k = 16` the VNNI
///   kernel does 101 G); NIN every layer as lookups at K = 64, batch 64: its lookups took
///   8.7 ms against 3.2 ms at K = 16, the whole model 15.7 against 9.4 ms (1.19× and 1.98×
///   ONNX Runtime on the original);
/// - for `k = 16` and `m ≥ 16` when the best shuffle kernel is the AVX2 one (an AVX2-only CPU, or
///   `TABCONV_SIMD=avx2`). Its `vpshufb` pairs need two shuffles, two blends, two
///   `vpmaddubsw` and two adds per 64 lookups and output (with 2 outputs per block instead of
///   4, fewer registers, it did no better): on an Intel Xeon (Emerald Rapids) limited to
///   AVX2 (docs/cpuid_avx2.c), c = m = 64, it does 24 G lookups/s against 35 G row-wise (41–51 G
///   since the row-wise AVX2 kernel adds its entries as 16-bit words), and
///   ResNet-18 w64's lookups (batch 64, one thread) took 12.4 ms against 7.5 ms row-wise; NIN's
///   11.8 against 8.7 ms, the ResNet-18/16 fixture's 18.7 against 16.2 ms.
pub fn prefer_rowwise(rows: usize, k: usize, m: usize) -> bool {
    let best = LutKernel::detect();
    #[cfg(target_arch = "x86_64")]
    let vbmi = matches!(best, LutKernel::Avx512 | LutKernel::Vnni) && vbmi_supported();
    #[cfg(not(target_arch = "x86_64"))]
    let vbmi = false;
    // and k = 16 from 16 outputs where AVX2 is the best
    let vnni = matches!(k, 64 | 128) && best == LutKernel::Vnni;
    rows <= ROWWISE_MAX_ROWS
        || (k == 256 && !vbmi)
        || (rowwise_by_shape(k, m) && !vnni)
        || (m >= 16 && best == LutKernel::Avx2)
}

/// The part of [`prefer_rowwise`] that depends on the layer's shape alone (not on the CPU or
/// the batch), which `mask`'s time model prices by: from 16 outputs, every `k` but 16 (256
/// included). At `k = 64` and `128` a CPU with the VNNI kernel runs that instead (faster: the
/// time model prices the portable choice).
pub fn rowwise_by_shape(k: usize, m: usize) -> bool {
    m >= 16 && k != 16
}

/// [`lut_i8_rowwise`] with an epilogue, parallel over blocks of rows: each block's i32 sums are
/// handed, while in cache, to `epilogue(first_row, sums, out)`, which writes that block's `out`
/// (every value). `out` may be uninitialised. Exact integer sums: the result does not depend on
/// the blocks or the thread count.
#[allow(clippy::too_many_arguments)]
pub fn lut_i8_rowwise_then<T: Send>(
    level: Simd,
    codes: &[u8],
    rows: usize,
    c: usize,
    tables_ckm: &[u8],
    m: usize,
    k: usize,
    out: &mut [T],
    epilogue: impl Fn(usize, &[i32], &mut [T]) + Sync,
) {
    check_shapes(codes.len(), rows, c, tables_ckm.len(), m, k, out.len());
    check_codes(codes, k);
    if out.is_empty() {
        return;
    }
    if rows <= ROWWISE_PAR_ROWS {
        // few rows: the output tiles of `lut_i8_rowwise_at` may run in parallel
        let mut sums = vec![0i32; rows * m];
        if c > 0 {
            lut_i8_rowwise_at(level, codes, rows, c, tables_ckm, m, k, &mut sums);
        }
        epilogue(0, &sums, out);
        return;
    }
    super::team::for_chunks(out, ROWWISE_PAR_ROWS * m, |bi, out| {
        let nr = out.len() / m;
        let r0 = bi * ROWWISE_PAR_ROWS;
        TASK.with_borrow_mut(|(_, sums)| {
            sums.resize(nr * m, 0);
            if c == 0 {
                sums.fill(0);
            } else {
                let codes = &codes[r0 * c..(r0 + nr) * c];
                rowwise_tile(level, codes, c, tables_ckm, m, k, 0, m, sums);
            }
            epilogue(r0, sums, out);
        })
    });
}

/// Table bytes from which the row-wise kernels prefetch the runs of codes ahead: the runs a
/// row's codes select are scattered over the table, so beyond L1/L2 each one waits for memory
/// (the default ResNet-18 w64 `.tcv` at batch 64, AVX2: the whole model 6 % faster; at
/// AVX-512 no difference at batch 64 and 3 % at batch 1, mins of alternated runs), while a
/// smaller table pays for the prefetches (NIN's 123 KB one at AVX2: 3 % slower).
const PREFETCH_TABLE_BYTES: usize = 1 << 18;

/// Outputs `m0 .. m0 + mw` of every row into `out` (`rows × mw`): the SIMD kernels take the
/// outputs in register tiles, the scalar code whatever they leave.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rowwise_tile(
    level: Simd,
    codes: &[u8],
    c: usize,
    t: &[u8],
    m: usize,
    k: usize,
    m0: usize,
    mw: usize,
    out: &mut [i32],
) {
    assert!(level.supported());
    #[cfg(target_arch = "x86_64")]
    {
        let mut a = rowwise_x86::Tile {
            codes,
            c,
            t,
            m,
            k,
            m0,
            out: &mut *out,
            ldo: mw,
            col0: 0,
            prefetch: c * k * m >= PREFETCH_TABLE_BYTES,
        };
        let pick = match level {
            Simd::Avx512 if LutKernel::Avx512.supported() => Some(rowwise_x86::avx512 as fn(_) -> _),
            Simd::Scalar => None,
            _ => Some(rowwise_x86::avx2 as fn(_) -> _),
        };
        // SAFETY: the level's instructions are available (AVX-512BW for `avx512`, AVX2 for
        // both); `check_shapes`/`check_codes` bound every read.
        let done = pick.map_or(0, |pick| unsafe { rowwise_x86::tiles(pick, mw, &mut a) });
        if done < mw {
            rowwise_scalar(codes, c, t, m, k, m0 + done, mw - done, out, mw, done);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    rowwise_scalar(codes, c, t, m, k, m0, mw, out, mw, 0);
}

#[cfg(target_arch = "x86_64")]
mod rowwise_x86 {
    //! Register-tiled row-wise lookups: for each row and tile of outputs, the i16 sums stay in
    //! registers while every codebook's selected table run is widened and added; flushed to i32
    //! after at most 256 codebooks (|Σ| ≤ 256·128 fits an i16, as in the scalar code).
    use std::arch::x86_64::*;

    /// What a row-wise tile reads and writes: the rows' `codes` (`c` per row), the `[c][k][m]`
    /// table `t`, the tile's first output `m0`, and `out` (rows of `ldo`) from column `col0`.
    pub(super) struct Tile<'a> {
        pub codes: &'a [u8],
        pub c: usize,
        pub t: &'a [u8],
        pub m: usize,
        pub k: usize,
        pub m0: usize,
        pub out: &'a mut [i32],
        pub ldo: usize,
        pub col0: usize,
        /// Prefetch the table runs of the codes [`PF`] codebooks ahead (tables beyond L1/L2).
        pub prefetch: bool,
    }

    /// A tile kernel ([`tile_avx512`], [`tile_avx2_words`], [`tile_avx2`]).
    type Kernel = unsafe fn(Tile);

    /// Codebooks ahead whose selected table runs the row-wise kernels prefetch.
    const PF: usize = 16;

    /// The AVX-512BW tile for `left` outputs (a multiple of 16): up to 4 registers of 32
    /// outputs, a last 16 by the AVX2 tile; with its width.
    pub(super) fn avx512(left: usize) -> (Kernel, usize) {
        match left / 32 {
            0 => (tile_avx2::<1>, 16),
            1 => (tile_avx512::<1>, 32),
            2 => (tile_avx512::<2>, 64),
            3 => (tile_avx512::<3>, 96),
            _ => (tile_avx512::<4>, 128),
        }
    }

    /// The AVX2 tile for `left` outputs (a multiple of 16): up to 4 registers of 32 outputs
    /// added as words, where 16 are left over a 16-output tail in the same pass; with its width.
    pub(super) fn avx2(left: usize) -> (Kernel, usize) {
        match left {
            128.. => (tile_avx2_words::<4, false>, 128),
            112 => (tile_avx2_words::<3, true>, 112),
            96 => (tile_avx2_words::<3, false>, 96),
            80 => (tile_avx2_words::<2, true>, 80),
            64 => (tile_avx2_words::<2, false>, 64),
            48 => (tile_avx2_words::<1, true>, 48),
            32 => (tile_avx2_words::<1, false>, 32),
            _ => (tile_avx2::<1>, 16),
        }
    }

    /// Outputs `0 ..` of `a` (outputs `a.m0 ..`, columns `a.col0 ..` of `a.out`) for every row
    /// in the register tiles `pick(outputs left)` chooses, over the largest multiple of 16 in
    /// `mw`; returns it. Output tiles outside, rows inside: a tile's table columns are read for
    /// every row of the block while in cache rather than the whole table per row.
    ///
    /// # Safety
    /// The kernels' SIMD level is available; `a` holds the rows' codes (each `< k`), the whole
    /// table, outputs `m0 + mw ≤ m`, and `out` rows of at least `col0 + mw` columns.
    pub(super) unsafe fn tiles(pick: fn(usize) -> (Kernel, usize), mw: usize, a: &mut Tile) -> usize {
        let done = mw / 16 * 16;
        let mut j = 0;
        while j < done {
            let (kernel, width) = pick(done - j);
            kernel(Tile {
                m0: a.m0 + j,
                col0: a.col0 + j,
                out: &mut *a.out,
                ..*a
            });
            j += width;
        }
        done
    }

    /// When `on`, prefetch the `width` table entries that code `i + PF` of `chunk` selects (its
    /// codebook's `[k][m]` table `PF · k · m` entries after `base`).
    #[inline(always)]
    unsafe fn prefetch_ahead(on: bool, chunk: &[u8], i: usize, base: *const u8, (k, m): (usize, usize), width: usize) {
        if let Some(&ahead) = chunk.get(i + PF).filter(|_| on) {
            let q = base.wrapping_add(PF * k * m + ahead as usize * m);
            for off in (0..width).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(off).cast());
            }
        }
    }

    /// One tile of `Q` registers of 32 outputs (see [`tile_avx2`]).
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn tile_avx512<const Q: usize>(a: Tile) {
        let (t, m, k, pf) = (a.t, a.m, a.k, a.prefetch);
        for (row, o) in a.codes.chunks_exact(a.c).zip(a.out.chunks_exact_mut(a.ldo)) {
            let o = &mut o[a.col0..];
            let mut tot = [[_mm512_setzero_si512(); 2]; Q];
            for (chunk_i, chunk) in row.chunks(256).enumerate() {
                let mut acc = [_mm512_setzero_si512(); Q];
                let mut base = t.as_ptr().add(chunk_i * 256 * k * m + a.m0);
                for (i, &code) in chunk.iter().enumerate() {
                    let p = base.add(code as usize * m);
                    prefetch_ahead(pf, chunk, i, base, (k, m), 32 * Q);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(r * 32).cast()));
                        *a = _mm512_add_epi16(*a, v);
                    }
                    // past the last codebook this leaves the table: wrapping, never read
                    base = base.wrapping_add(k * m);
                }
                let bias = _mm512_set1_epi32(128 * chunk.len() as i32);
                for (a, tot) in acc.iter().zip(tot.iter_mut()) {
                    let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(*a));
                    let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(*a));
                    tot[0] = _mm512_add_epi32(tot[0], _mm512_sub_epi32(lo, bias));
                    tot[1] = _mm512_add_epi32(tot[1], _mm512_sub_epi32(hi, bias));
                }
            }
            for (r, tot) in tot.iter().enumerate() {
                _mm512_storeu_si512(o.as_mut_ptr().add(32 * r).cast(), tot[0]);
                _mm512_storeu_si512(o.as_mut_ptr().add(32 * r + 16).cast(), tot[1]);
            }
        }
    }

    /// One tile of `Q` registers of 16 outputs from `m0` (columns `col0 ..` of `out`). `Q` is
    /// a constant so that the sums are registers (no per-codebook checks of the tile's width, no
    /// stack array). Entries are biased by 128 ([`super::transpose_tables`]): unsigned sums of
    /// at most 256 codebooks fit 16 bits; the bias comes off when they are widened.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2<const Q: usize>(a: Tile) {
        let (t, m, k) = (a.t, a.m, a.k);
        for (row, o) in a.codes.chunks_exact(a.c).zip(a.out.chunks_exact_mut(a.ldo)) {
            let o = &mut o[a.col0..];
            let mut tot = [[_mm256_setzero_si256(); 2]; Q];
            for (chunk_i, chunk) in row.chunks(256).enumerate() {
                let mut acc = [_mm256_setzero_si256(); Q];
                // the chunk's first codebook's table at code 0 (codebook `i`: `i · k · m` entries
                // in), plus the tile's first output
                let mut base = t.as_ptr().add(chunk_i * 256 * k * m + a.m0);
                for &code in chunk {
                    let p = base.add(code as usize * m);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(r * 16).cast()));
                        *a = _mm256_add_epi16(*a, v);
                    }
                    // past the last codebook this leaves the table: wrapping, never read
                    base = base.wrapping_add(k * m);
                }
                let bias = _mm256_set1_epi32(128 * chunk.len() as i32);
                for (a, tot) in acc.iter().zip(tot.iter_mut()) {
                    let lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(*a));
                    let hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(*a));
                    tot[0] = _mm256_add_epi32(tot[0], _mm256_sub_epi32(lo, bias));
                    tot[1] = _mm256_add_epi32(tot[1], _mm256_sub_epi32(hi, bias));
                }
            }
            for (r, tot) in tot.iter().enumerate() {
                _mm256_storeu_si256(o.as_mut_ptr().add(16 * r).cast(), tot[0]);
                _mm256_storeu_si256(o.as_mut_ptr().add(16 * r + 8).cast(), tot[1]);
            }
        }
    }

    /// One tile of `Q` registers of 32 outputs (and 16 more when `TAIL`), the entries added two
    /// at a time as 16-bit words without widening each byte (widening runs on one port; these
    /// adds and shifts on three): `w` sums whole words, `h` their high bytes (the odd
    /// outputs); the even outputs are `w − 256·h`, exact modulo 2¹⁶ since the unsigned sums of
    /// at most 256 codebooks stay below 2¹⁶. The tail is widened as in [`tile_avx2`]. The table
    /// run of the code `PF` codebooks ahead is prefetched (the runs a row's codes select are
    /// scattered over the table). Each row's sums go straight to `out` (added to it after the
    /// first 256 codebooks), so that only the 16-bit sums live in registers.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2_words<const Q: usize, const TAIL: bool>(a: Tile) {
        let (t, m, k, pf) = (a.t, a.m, a.k, a.prefetch);
        let width = 32 * Q + if TAIL { 16 } else { 0 };
        for (row, o) in a.codes.chunks_exact(a.c).zip(a.out.chunks_exact_mut(a.ldo)) {
            let o = o[a.col0..][..width].as_mut_ptr();
            for (chunk_i, chunk) in row.chunks(256).enumerate() {
                let mut w = [_mm256_setzero_si256(); Q];
                let mut h = [_mm256_setzero_si256(); Q];
                let mut tail = _mm256_setzero_si256();
                let mut base = t.as_ptr().add(chunk_i * 256 * k * m + a.m0);
                for (i, &code) in chunk.iter().enumerate() {
                    let p = base.add(code as usize * m);
                    prefetch_ahead(pf, chunk, i, base, (k, m), width);
                    for r in 0..Q {
                        let x = _mm256_loadu_si256(p.add(r * 32).cast());
                        w[r] = _mm256_add_epi16(w[r], x);
                        h[r] = _mm256_add_epi16(h[r], _mm256_srli_epi16::<8>(x));
                    }
                    if TAIL {
                        let x = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(32 * Q).cast()));
                        tail = _mm256_add_epi16(tail, x);
                    }
                    // past the last codebook this leaves the table: wrapping, never read
                    base = base.wrapping_add(k * m);
                }
                let bias = _mm256_set1_epi32(128 * chunk.len() as i32);
                // eight outputs from `part`'s eight 16-bit sums, at output `at`
                let put = |at: usize, part: __m128i| {
                    let d = o.add(at).cast::<__m256i>();
                    let mut v = _mm256_sub_epi32(_mm256_cvtepu16_epi32(part), bias);
                    if chunk_i > 0 {
                        v = _mm256_add_epi32(v, _mm256_loadu_si256(d));
                    }
                    _mm256_storeu_si256(d, v);
                };
                for r in 0..Q {
                    let lo = _mm256_sub_epi16(w[r], _mm256_slli_epi16::<8>(h[r]));
                    // per 128-bit lane, word i of `lo` is output 2i, of `h` output 2i + 1:
                    // `a` holds outputs 0..8 | 16..24, `b` 8..16 | 24..32
                    let (a, b) = (_mm256_unpacklo_epi16(lo, h[r]), _mm256_unpackhi_epi16(lo, h[r]));
                    put(32 * r, _mm256_castsi256_si128(a));
                    put(32 * r + 8, _mm256_castsi256_si128(b));
                    put(32 * r + 16, _mm256_extracti128_si256::<1>(a));
                    put(32 * r + 24, _mm256_extracti128_si256::<1>(b));
                }
                if TAIL {
                    put(32 * Q, _mm256_castsi256_si128(tail));
                    put(32 * Q + 8, _mm256_extracti128_si256::<1>(tail));
                }
            }
        }
    }
}

/// Scalar row-wise lookups of outputs `m0 .. m0 + mw` into columns `col0 ..` of `out` (rows of
/// `ldo`).
#[allow(clippy::too_many_arguments)]
fn rowwise_scalar(
    codes: &[u8],
    c: usize,
    t: &[u8],
    m: usize,
    k: usize,
    m0: usize,
    mw: usize,
    out: &mut [i32],
    ldo: usize,
    col0: usize,
) {
    let mut acc16 = vec![0i16; mw];
    for (codes, o) in codes.chunks_exact(c).zip(out.chunks_exact_mut(ldo)) {
        let o = &mut o[col0..col0 + mw];
        o.fill(0);
        for (chunk_i, chunk) in codes.chunks(256).enumerate() {
            acc16.fill(0);
            for (j, &code) in chunk.iter().enumerate() {
                let ci = chunk_i * 256 + j;
                let row = &t[(ci * k + code as usize) * m + m0..][..mw];
                for (a, &v) in acc16.iter_mut().zip(row) {
                    *a = a.wrapping_add((v ^ 0x80) as i8 as i16);
                }
            }
            for (o, &v) in o.iter_mut().zip(acc16.iter()) {
                *o += v as i32;
            }
        }
    }
}

/// f32 tables `[c][m][k]` → f32 sums. Every output is accumulated from 0.0 in codebook order
/// `ci = 0..c`, so the result is deterministic (independent of threads and blocking).
pub fn lut_f32(codes: &[u8], rows: usize, c: usize, tables: &[f32], m: usize, k: usize, out: &mut [f32]) {
    check_shapes(codes.len(), rows, c, tables.len(), m, k, out.len());
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(PAR_ROWS * m)
        .enumerate()
        .for_each_init(Vec::new, |acc, (bi, out)| {
            let r0 = bi * PAR_ROWS;
            let nr = out.len() / m;
            scalar_f32(&codes[r0 * c..(r0 + nr) * c], nr, c, tables, m, k, out, acc);
        });
}

thread_local! {
    /// A task's buffers and block of sums, reused by every task the thread runs (the
    /// epilogues a task calls never start lookups of their own).
    static TASK: std::cell::RefCell<(Scratch, Vec<i32>)> = std::cell::RefCell::default();
}

/// Per-task buffers reused across the tasks a thread runs.
#[derive(Default)]
struct Scratch {
    acc: Vec<i32>,
    packed: Vec<u8>,
    masks: Vec<u64>,
}

/// Gathers column `ci` (and the next `G-1`) of `nb` rows of row-major codes into `cols[g][..nb]`.
#[inline(always)]
fn gather_cols<const G: usize>(codes: &[u8], c: usize, ci: usize, nb: usize, cols: &mut [[u8; SCALAR_ROWS]; G]) {
    for (r, row) in codes.chunks_exact(c).take(nb).enumerate() {
        for (g, col) in cols.iter_mut().enumerate() {
            col[r] = row[ci + g];
        }
    }
}

/// Scalar int8 kernel over `nr` rows (`codes`: `nr × c`, `out`: `nr × m`).
#[allow(clippy::too_many_arguments)]
fn scalar_i8(codes: &[u8], nr: usize, c: usize, tables: &[i8], m: usize, k: usize, out: &mut [i32], s: &mut Scratch) {
    debug_assert_eq!(codes.len(), nr * c);
    check_codes(codes, k);
    let acc = &mut s.acc;
    acc.clear();
    acc.resize(m * SCALAR_ROWS, 0);
    for (bi, out) in out.chunks_mut(SCALAR_ROWS * m).enumerate() {
        let nb = out.len() / m;
        let codes = &codes[bi * SCALAR_ROWS * c..(bi * SCALAR_ROWS + nb) * c];
        acc.fill(0);
        let mut ci = 0;
        // Four codebooks at a time: four lookups per accumulator load/store.
        while ci + 4 <= c {
            let mut cols = [[0u8; SCALAR_ROWS]; 4];
            gather_cols(codes, c, ci, nb, &mut cols);
            for (mi, a) in acc.chunks_exact_mut(SCALAR_ROWS).enumerate() {
                let t: [&[i8]; 4] = std::array::from_fn(|g| &tables[((ci + g) * m + mi) * k..][..k]);
                let [c0, c1, c2, c3] = &cols;
                let it = a[..nb]
                    .iter_mut()
                    .zip(&c0[..nb])
                    .zip(&c1[..nb])
                    .zip(&c2[..nb])
                    .zip(&c3[..nb]);
                for ((((a, &x0), &x1), &x2), &x3) in it {
                    // SAFETY: `check_codes` ensured every code is < k == t[g].len().
                    unsafe {
                        *a += *t[0].get_unchecked(x0 as usize) as i32
                            + *t[1].get_unchecked(x1 as usize) as i32
                            + *t[2].get_unchecked(x2 as usize) as i32
                            + *t[3].get_unchecked(x3 as usize) as i32;
                    }
                }
            }
            ci += 4;
        }
        while ci < c {
            let mut cols = [[0u8; SCALAR_ROWS]; 1];
            gather_cols(codes, c, ci, nb, &mut cols);
            for (mi, a) in acc.chunks_exact_mut(SCALAR_ROWS).enumerate() {
                let t = &tables[(ci * m + mi) * k..][..k];
                for (a, &code) in a[..nb].iter_mut().zip(&cols[0][..nb]) {
                    // SAFETY: `check_codes` ensured every code is < k == t.len().
                    *a += unsafe { *t.get_unchecked(code as usize) } as i32;
                }
            }
            ci += 1;
        }
        for (r, o) in out.chunks_exact_mut(m).enumerate() {
            for (mi, o) in o.iter_mut().enumerate() {
                *o = acc[mi * SCALAR_ROWS + r];
            }
        }
    }
}

/// Scalar f32 kernel over `nr` rows; strict codebook order per output.
#[allow(clippy::too_many_arguments)]
fn scalar_f32(
    codes: &[u8],
    nr: usize,
    c: usize,
    tables: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    acc: &mut Vec<f32>,
) {
    debug_assert_eq!(codes.len(), nr * c);
    check_codes(codes, k);
    acc.clear();
    acc.resize(m * SCALAR_ROWS, 0.0);
    for (bi, out) in out.chunks_mut(SCALAR_ROWS * m).enumerate() {
        let nb = out.len() / m;
        let codes = &codes[bi * SCALAR_ROWS * c..(bi * SCALAR_ROWS + nb) * c];
        acc.fill(0.0);
        let mut ci = 0;
        while ci + 4 <= c {
            let mut cols = [[0u8; SCALAR_ROWS]; 4];
            gather_cols(codes, c, ci, nb, &mut cols);
            for (mi, a) in acc.chunks_exact_mut(SCALAR_ROWS).enumerate() {
                let t: [&[f32]; 4] = std::array::from_fn(|g| &tables[((ci + g) * m + mi) * k..][..k]);
                let [c0, c1, c2, c3] = &cols;
                let it = a[..nb]
                    .iter_mut()
                    .zip(&c0[..nb])
                    .zip(&c1[..nb])
                    .zip(&c2[..nb])
                    .zip(&c3[..nb]);
                for ((((a, &x0), &x1), &x2), &x3) in it {
                    // SAFETY: `check_codes` ensured every code is < k == t[g].len().
                    // The additions stay in codebook order: (((a + t0) + t1) + t2) + t3.
                    unsafe {
                        *a = *a
                            + *t[0].get_unchecked(x0 as usize)
                            + *t[1].get_unchecked(x1 as usize)
                            + *t[2].get_unchecked(x2 as usize)
                            + *t[3].get_unchecked(x3 as usize);
                    }
                }
            }
            ci += 4;
        }
        while ci < c {
            let mut cols = [[0u8; SCALAR_ROWS]; 1];
            gather_cols(codes, c, ci, nb, &mut cols);
            for (mi, a) in acc.chunks_exact_mut(SCALAR_ROWS).enumerate() {
                let t = &tables[(ci * m + mi) * k..][..k];
                for (a, &code) in a[..nb].iter_mut().zip(&cols[0][..nb]) {
                    // SAFETY: `check_codes` ensured every code is < k == t.len().
                    *a += unsafe { *t.get_unchecked(code as usize) };
                }
            }
            ci += 1;
        }
        for (r, o) in out.chunks_exact_mut(m).enumerate() {
            for (mi, o) in o.iter_mut().enumerate() {
                *o = acc[mi * SCALAR_ROWS + r];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "lut_k256.rs"]
mod k256;

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! `k == 16` shuffle kernels (and the VNNI kernel's `k == 64` and `128` forms, [`pair_block`]).
    //!
    //! Packed layout of a block of `R` rows (R = 32 for AVX2, 64 for AVX-512): for every codebook
    //! pair `j` (codebooks `2j`, `2j+1`), `R` bytes; byte `b` holds a code of codebook `2j` in its
    //! low nibble and one of codebook `2j+1` in its high nibble. The rows are arranged so that,
    //! after both lookups, one byte blend puts the two codebooks of the *same* row side by side
    //! (`H = R/2`):
    //!
    //! | byte      | low nibble (codebook 2j) | high nibble (codebook 2j+1) |
    //! |-----------|--------------------------|-----------------------------|
    //! | `2i`      | row `i`                  | row `i + H`                 |
    //! | `2i + 1`  | row `i + H`              | row `i`                     |
    //!
    //! With `lo = T_2j[low nibbles]` and `hi = T_2j+1[high nibbles]` (one `vpshufb` each, the
    //! 16-entry table broadcast into every 128-bit lane), `blend(lo, hi, odd bytes)` has row `i`'s
    //! two values in bytes `2i, 2i+1` and `blend(hi, lo, odd bytes)` has row `i + H`'s.
    //! `vpmaddubsw` with all-ones weights adds each byte pair into an i16 lane (sign-correct: the
    //! table bytes are its *signed* operand), so accumulator `a` lane `i` is row `i` and
    //! accumulator `b` lane `i` is row `i + H`, and widening them in order gives the rows in order.
    //!
    //! Packing is a 16×16 byte transpose per 16 codebooks (in every 128-bit lane) whose row loads
    //! follow the low-nibble order of the table; the high nibbles are the same with the two bytes
    //! of every 16-bit lane swapped.
    //!
    //! Padding: rows past the end get code 0 and their outputs are dropped; the high nibble of an
    //! odd last codebook is 0 and is looked up in an all-zero table, so it adds nothing.
    //!
    //! Overflow: every table entry is in [-128, 127], so a pair sum is in [-256, 254] and an i16
    //! lane that has summed `p` pairs is within [-256·p, 254·p] ⊂ [-32768, 32767] for any
    //! `p <= 128`, i.e. up to 256 codebooks (an odd tail is a pair whose second value is 0) — the
    //! "255 codebooks × 128 < 32767" bound, with pairs. The i16 sums are therefore exact, and the
    //! accumulators are flushed (widened to i32 and added to the i32 block result) after at most
    //! `FLUSH_PAIRS <= 128` pairs (checked at compile time).

    use super::Scratch;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Codebook pairs summed in i16 before a flush to i32 (see the overflow proof above). Also the
    /// chunk of packed codes kept in L1 while every output of the task is computed.
    const FLUSH_PAIRS: usize = 64;
    const _: () = assert!(FLUSH_PAIRS >= 1 && FLUSH_PAIRS * 256 <= 32768);

    /// The all-zero table used for the high nibble of an odd last codebook.
    static ZERO_TABLE: [i8; 16] = [0; 16];

    /// Swaps the two bytes of every 16-bit lane (`vpshufb` control, per 128-bit lane).
    static SWAP_BYTES: [u8; 16] = [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14];

    /// Row of a block of `r` rows whose code is at byte `b` of a low-nibble plane.
    #[inline(always)]
    fn plane_row(r: usize, b: usize) -> usize {
        if b.is_multiple_of(2) {
            b / 2
        } else {
            b / 2 + r / 2
        }
    }

    /// Source of the 16 codebooks `c0..c0+16` of a block of `nb <= r` rows: the codes themselves
    /// (`(data, stride, offset)`) when the tile is complete, else `stage` holding a zero-padded copy.
    fn tile_source<'a>(
        codes: &'a [u8],
        nb: usize,
        c: usize,
        c0: usize,
        r: usize,
        stage: &'a mut [u8],
    ) -> (&'a [u8], usize, usize) {
        let w = (c - c0).min(16);
        if nb == r && w == 16 {
            return (codes, c, c0);
        }
        stage.fill(0);
        for (row, st) in codes.chunks_exact(c).take(nb).zip(stage.chunks_exact_mut(16)) {
            st[..w].copy_from_slice(&row[c0..c0 + w]);
        }
        (stage, 16, 0)
    }

    /// Packs a block of `nb <= 32` rows (`codes`: `nb × c`) into `dst` (`ceil(c/2) × 32` bytes).
    #[target_feature(enable = "avx2")]
    fn pack_avx2(codes: &[u8], nb: usize, c: usize, dst: &mut [u8]) {
        const R: usize = 32;
        let np = c.div_ceil(2);
        assert!(nb <= R && codes.len() == nb * c && dst.len() == np * R);
        // SAFETY: SWAP_BYTES is 16 bytes.
        let swap = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(SWAP_BYTES.as_ptr().cast()) });
        let mut stage = [0u8; R * 16];
        for jb in 0..c.div_ceil(16) {
            let (src, stride, off) = tile_source(codes, nb, c, jb * 16, R, &mut stage);
            // register i, 128-bit lane l: 16 codes of row plane_row(16 l + i)
            let mut v: [__m256i; 16] = std::array::from_fn(|i| {
                let s0 = &src[plane_row(R, i) * stride + off..][..16];
                let s1 = &src[plane_row(R, 16 + i) * stride + off..][..16];
                // SAFETY: s0 and s1 are 16 bytes each.
                unsafe {
                    _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(s0.as_ptr().cast())),
                        _mm_loadu_si128(s1.as_ptr().cast()),
                    )
                }
            });
            // 16×16 byte transpose per lane: four perfect shuffles (each rotates the 8-bit
            // (register, byte) index by one bit); afterwards register t = codebook jb*16 + t.
            for _ in 0..4 {
                let w = v;
                for i in 0..8 {
                    v[2 * i] = _mm256_unpacklo_epi8(w[i], w[i + 8]);
                    v[2 * i + 1] = _mm256_unpackhi_epi8(w[i], w[i + 8]);
                }
            }
            for t in 0..8 {
                let j = jb * 8 + t;
                if j >= np {
                    break;
                }
                // codes < 16: the 16-bit shift moves each byte's nibble up without carrying.
                let p = _mm256_or_si256(
                    v[2 * t],
                    _mm256_slli_epi16::<4>(_mm256_shuffle_epi8(v[2 * t + 1], swap)),
                );
                let d = &mut dst[j * R..][..R];
                // SAFETY: d is 32 bytes.
                unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), p) };
            }
        }
    }

    /// Packs a block of `nb <= 64` rows (`codes`: `nb × c`) into `dst` (`ceil(c/2) × 64` bytes).
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn pack_avx512(codes: &[u8], nb: usize, c: usize, dst: &mut [u8]) {
        const R: usize = 64;
        let np = c.div_ceil(2);
        assert!(nb <= R && codes.len() == nb * c && dst.len() == np * R);
        // SAFETY: SWAP_BYTES is 16 bytes.
        let swap = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(SWAP_BYTES.as_ptr().cast()) });
        let mut stage = [0u8; R * 16];
        for jb in 0..c.div_ceil(16) {
            let (src, stride, off) = tile_source(codes, nb, c, jb * 16, R, &mut stage);
            // register i, 128-bit lane l: 16 codes of row plane_row(16 l + i)
            let mut v: [__m512i; 16] = std::array::from_fn(|i| {
                let s: [&[u8]; 4] = std::array::from_fn(|l| &src[plane_row(R, 16 * l + i) * stride + off..][..16]);
                // SAFETY: every s[l] is 16 bytes.
                unsafe {
                    let x = _mm512_castsi128_si512(_mm_loadu_si128(s[0].as_ptr().cast()));
                    let x = _mm512_inserti32x4::<1>(x, _mm_loadu_si128(s[1].as_ptr().cast()));
                    let x = _mm512_inserti32x4::<2>(x, _mm_loadu_si128(s[2].as_ptr().cast()));
                    _mm512_inserti32x4::<3>(x, _mm_loadu_si128(s[3].as_ptr().cast()))
                }
            });
            // 16×16 byte transpose per lane (see `pack_avx2`).
            for _ in 0..4 {
                let w = v;
                for i in 0..8 {
                    v[2 * i] = _mm512_unpacklo_epi8(w[i], w[i + 8]);
                    v[2 * i + 1] = _mm512_unpackhi_epi8(w[i], w[i + 8]);
                }
            }
            for t in 0..8 {
                let j = jb * 8 + t;
                if j >= np {
                    break;
                }
                // codes < 16: the 16-bit shift moves each byte's nibble up without carrying.
                let p = _mm512_or_si512(
                    v[2 * t],
                    _mm512_slli_epi16::<4>(_mm512_shuffle_epi8(v[2 * t + 1], swap)),
                );
                let d = &mut dst[j * R..][..R];
                // SAFETY: d is 64 bytes.
                unsafe { _mm512_storeu_si512(d.as_mut_ptr().cast(), p) };
            }
        }
    }

    /// Outputs per block of the relaid-out tables (a multiple of every `Isa::MB`).
    const LAYOUT_OUTPUTS: usize = 8;

    /// Copies `[c][m][16]` tables into blocks of `LAYOUT_OUTPUTS` outputs, `[m/8][c][8][16]` (the
    /// last block narrower): the rows a group of outputs reads are then one sequential stream
    /// instead of `c` rows `m·16` bytes apart, which for power-of-two `m` all fall into the same
    /// few L1 sets.
    pub(super) fn relayout(tables: &[i8], c: usize, m: usize) -> Vec<i8> {
        assert_eq!(tables.len(), c * m * 16);
        let mut v = vec![0i8; tables.len()];
        for b0 in (0..m).step_by(LAYOUT_OUTPUTS) {
            let w = (m - b0).min(LAYOUT_OUTPUTS);
            let blk = &mut v[b0 * c * 16..(b0 + w) * c * 16];
            for (ci, dst) in blk.chunks_exact_mut(w * 16).enumerate() {
                dst.copy_from_slice(&tables[(ci * m + b0) * 16..][..w * 16]);
            }
        }
        v
    }

    /// The int8 tables of a call: `[c][m][16]`, or relaid out by [`relayout`].
    #[derive(Clone, Copy)]
    pub(super) struct Tables<'a> {
        pub data: &'a [i8],
        pub relaid: bool,
    }

    /// Table rows of a group of outputs: codebook `ci` of output `n` of the group is the 16 bytes
    /// at `base + ci*cb_stride + n*16` of `data`.
    #[derive(Clone, Copy)]
    struct Group<'a> {
        data: &'a [i8],
        base: usize,
        cb_stride: usize,
    }

    impl<'a> Tables<'a> {
        /// The group of outputs starting at `mi0` (must not cross a layout block).
        fn group(self, c: usize, m: usize, mi0: usize) -> Group<'a> {
            if self.relaid {
                let b0 = mi0 / LAYOUT_OUTPUTS * LAYOUT_OUTPUTS;
                let w = (m - b0).min(LAYOUT_OUTPUTS);
                Group {
                    data: self.data,
                    base: b0 * c * 16 + (mi0 - b0) * 16,
                    cb_stride: w * 16,
                }
            } else {
                Group {
                    data: self.data,
                    base: mi0 * 16,
                    cb_stride: m * 16,
                }
            }
        }
    }

    /// Checks the arguments of a block function of `r` rows and `nb` outputs; returns the number
    /// of complete pairs (both codebooks < c) below `p1`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn check_block(r: usize, nb: usize, packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &[i32]) -> usize {
        assert!(p0 <= p1 && p1 * r <= packed.len() && p1 <= c.div_ceil(2) && p1 - p0 <= FLUSH_PAIRS);
        assert!(acc.len() == nb * r && c >= 1 && g.base + (c - 1) * g.cb_stride + nb * 16 <= g.data.len());
        p1.min(c / 2)
    }

    /// One codebook pair of a block of 32 rows for `NB` outputs: `x` the packed codes, `tl`/`th`
    /// the rows of output 0 for the low/high codebook, `th_step` the step between outputs of `th`.
    ///
    /// # Safety
    /// `tl + n*16` and `th + n*th_step` point to 16 readable bytes for every `n < NB`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn pair_avx2<const NB: usize>(
        x: __m256i,
        tl: *const i8,
        th: *const i8,
        th_step: usize,
        a: &mut [__m256i; NB],
        b: &mut [__m256i; NB],
    ) {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi8(1);
        let odd = _mm256_set1_epi16(0xFF00u16 as i16);
        let lo_idx = _mm256_and_si256(x, mask);
        let hi_idx = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
        for n in 0..NB {
            // SAFETY: guaranteed by the caller.
            let (t0, t1) = unsafe {
                (
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(tl.add(n * 16).cast())),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(th.add(n * th_step).cast())),
                )
            };
            let lo = _mm256_shuffle_epi8(t0, lo_idx);
            let hi = _mm256_shuffle_epi8(t1, hi_idx);
            a[n] = _mm256_add_epi16(a[n], _mm256_maddubs_epi16(ones, _mm256_blendv_epi8(lo, hi, odd)));
            b[n] = _mm256_add_epi16(b[n], _mm256_maddubs_epi16(ones, _mm256_blendv_epi8(hi, lo, odd)));
        }
    }

    /// [`pair_avx2`] for 64 rows.
    ///
    /// # Safety
    /// `tl + n*16` and `th + n*th_step` point to 16 readable bytes for every `n < NB`.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    #[inline]
    unsafe fn pair_avx512<const NB: usize>(
        x: __m512i,
        tl: *const i8,
        th: *const i8,
        th_step: usize,
        a: &mut [__m512i; NB],
        b: &mut [__m512i; NB],
    ) {
        const ODD: __mmask64 = 0xAAAA_AAAA_AAAA_AAAA;
        let mask = _mm512_set1_epi8(0x0F);
        let ones = _mm512_set1_epi8(1);
        let lo_idx = _mm512_and_si512(x, mask);
        let hi_idx = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
        for n in 0..NB {
            // SAFETY: guaranteed by the caller.
            let (t0, t1) = unsafe {
                (
                    _mm512_broadcast_i32x4(_mm_loadu_si128(tl.add(n * 16).cast())),
                    _mm512_broadcast_i32x4(_mm_loadu_si128(th.add(n * th_step).cast())),
                )
            };
            let lo = _mm512_shuffle_epi8(t0, lo_idx);
            let hi = _mm512_shuffle_epi8(t1, hi_idx);
            a[n] = _mm512_add_epi16(a[n], _mm512_maddubs_epi16(ones, _mm512_mask_blend_epi8(ODD, lo, hi)));
            b[n] = _mm512_add_epi16(b[n], _mm512_maddubs_epi16(ones, _mm512_mask_blend_epi8(ODD, hi, lo)));
        }
    }

    /// Sums pairs `p0..p1` of one block of 32 rows (`packed`: the block's pairs × 32 bytes) for
    /// the `NB` outputs of group `g` and adds them into `acc` (`[NB][32]` i32).
    #[target_feature(enable = "avx2")]
    fn block_avx2<const NB: usize>(packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &mut [i32]) {
        const R: usize = 32;
        let complete = check_block(R, NB, packed, g, c, p0, p1, acc);
        let mut a = [_mm256_setzero_si256(); NB];
        let mut b = [_mm256_setzero_si256(); NB];
        for j in p0..p1 {
            // SAFETY: j < p1 and p1*R <= packed.len().
            let x = unsafe { _mm256_loadu_si256(packed.as_ptr().add(j * R).cast()) };
            let tl = g.data.as_ptr().wrapping_add(g.base + 2 * j * g.cb_stride);
            // SAFETY: codebooks 2j (and 2j+1 when j < complete) are < c, so check_block
            // guarantees 16 bytes at every output's row; else the high half reads ZERO_TABLE.
            unsafe {
                if j < complete {
                    pair_avx2(x, tl, tl.wrapping_add(g.cb_stride), 16, &mut a, &mut b)
                } else {
                    pair_avx2(x, tl, ZERO_TABLE.as_ptr(), 0, &mut a, &mut b)
                }
            }
        }
        for (n, dst) in acc.chunks_exact_mut(R).enumerate() {
            let rows = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a[n])),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(a[n])),
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b[n])),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(b[n])),
            ];
            for (d, v) in dst.chunks_exact_mut(8).zip(rows) {
                // SAFETY: d is 8 i32.
                unsafe {
                    let p = d.as_mut_ptr().cast::<__m256i>();
                    _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), v));
                }
            }
        }
    }

    /// [`block_avx2`] for blocks of 64 rows (`acc`: `[NB][64]` i32).
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn block_avx512<const NB: usize>(packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &mut [i32]) {
        const R: usize = 64;
        let complete = check_block(R, NB, packed, g, c, p0, p1, acc);
        let mut a = [_mm512_setzero_si512(); NB];
        let mut b = [_mm512_setzero_si512(); NB];
        for j in p0..p1 {
            // SAFETY: j < p1 and p1*R <= packed.len().
            let x = unsafe { _mm512_loadu_si512(packed.as_ptr().add(j * R).cast()) };
            let tl = g.data.as_ptr().wrapping_add(g.base + 2 * j * g.cb_stride);
            // SAFETY: codebooks 2j (and 2j+1 when j < complete) are < c, so check_block
            // guarantees 16 bytes at every output's row; else the high half reads ZERO_TABLE.
            unsafe {
                if j < complete {
                    pair_avx512(x, tl, tl.wrapping_add(g.cb_stride), 16, &mut a, &mut b)
                } else {
                    pair_avx512(x, tl, ZERO_TABLE.as_ptr(), 0, &mut a, &mut b)
                }
            }
        }
        for (n, dst) in acc.chunks_exact_mut(R).enumerate() {
            let rows = [
                _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a[n])),
                _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a[n])),
                _mm512_cvtepi16_epi32(_mm512_castsi512_si256(b[n])),
                _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(b[n])),
            ];
            for (d, v) in dst.chunks_exact_mut(16).zip(rows) {
                // SAFETY: d is 16 i32.
                unsafe {
                    let p = d.as_mut_ptr().cast();
                    _mm512_storeu_si512(p, _mm512_add_epi32(_mm512_loadu_si512(p), v));
                }
            }
        }
    }

    /// Writes the block result `acc` (`[m][r]` i32) as `nb <= r` rows of `out` (`nb × m`), with
    /// 8×8 AVX2 transposes.
    #[target_feature(enable = "avx2")]
    pub(super) fn store_rows(acc: &[i32], r: usize, m: usize, nb: usize, out: &mut [i32]) {
        assert!(nb <= r && acc.len() == m * r && out.len() == nb * m);
        let mut r0 = 0;
        while r0 + 8 <= nb {
            let mut m0 = 0;
            while m0 + 8 <= m {
                let v: [__m256i; 8] = std::array::from_fn(|i| {
                    let s = &acc[(m0 + i) * r + r0..][..8];
                    // SAFETY: s is 8 i32.
                    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
                });
                // SAFETY: AVX2 is enabled on this function.
                let cols = unsafe { crate::interp::kernels::transpose8_epi32(v) };
                for (q, &w) in cols.iter().enumerate() {
                    let d = &mut out[(r0 + q) * m + m0..][..8];
                    // SAFETY: d is 8 i32.
                    unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), w) };
                }
                m0 += 8;
            }
            for mi in m0..m {
                for i in r0..r0 + 8 {
                    out[i * m + mi] = acc[mi * r + i];
                }
            }
            r0 += 8;
        }
        for i in r0..nb {
            for mi in 0..m {
                out[i * m + mi] = acc[mi * r + i];
            }
        }
    }

    /// [`store_rows`] with 16×16 AVX-512 transposes (the rows and outputs past the last whole
    /// tile by scalar copies).
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rows512(acc: &[i32], r: usize, m: usize, nb: usize, out: &mut [i32]) {
        assert!(nb <= r && acc.len() == m * r && out.len() == nb * m);
        let (r16, m16) = (nb / 16 * 16, m / 16 * 16);
        for r0 in (0..r16).step_by(16) {
            for m0 in (0..m16).step_by(16) {
                // SAFETY: output m0 + i's rows r0 .. r0 + 16 lie in acc.
                let v: [__m512i; 16] =
                    std::array::from_fn(|i| unsafe { _mm512_loadu_si512(acc.as_ptr().add((m0 + i) * r + r0).cast()) });
                // SAFETY: AVX-512F.
                let t = unsafe { crate::interp::kernels::transpose16_epi32(v) };
                for (q, w) in t.into_iter().enumerate() {
                    let d = &mut out[(r0 + q) * m + m0..][..16];
                    // SAFETY: d is 16 i32.
                    unsafe { _mm512_storeu_si512(d.as_mut_ptr().cast(), w) };
                }
            }
            for mi in m16..m {
                for i in r0..r0 + 16 {
                    out[i * m + mi] = acc[mi * r + i];
                }
            }
        }
        for i in r16..nb {
            for mi in 0..m {
                out[i * m + mi] = acc[mi * r + i];
            }
        }
    }

    /// One instruction set: rows per block, outputs per block call, and its packing and block
    /// functions.
    trait Isa {
        const R: usize;
        const MB: usize;
        /// # Safety
        /// The CPU supports the instruction set.
        unsafe fn pack(codes: &[u8], nb: usize, c: usize, dst: &mut [u8]);
        /// Dispatches to the block function for `acc.len() / R <= MB` outputs.
        ///
        /// # Safety
        /// The CPU supports the instruction set.
        unsafe fn block(packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &mut [i32]);
    }

    struct Avx2;
    struct Avx512;

    impl Isa for Avx2 {
        const R: usize = 32;
        const MB: usize = 4;
        unsafe fn pack(codes: &[u8], nb: usize, c: usize, dst: &mut [u8]) {
            // SAFETY: the caller guarantees AVX2.
            unsafe { pack_avx2(codes, nb, c, dst) }
        }
        unsafe fn block(packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &mut [i32]) {
            // SAFETY: the caller guarantees AVX2.
            unsafe {
                match acc.len() / Self::R {
                    4 => block_avx2::<4>(packed, g, c, p0, p1, acc),
                    3 => block_avx2::<3>(packed, g, c, p0, p1, acc),
                    2 => block_avx2::<2>(packed, g, c, p0, p1, acc),
                    1 => block_avx2::<1>(packed, g, c, p0, p1, acc),
                    _ => unreachable!(),
                }
            }
        }
    }

    impl Isa for Avx512 {
        const R: usize = 64;
        const MB: usize = 8;
        unsafe fn pack(codes: &[u8], nb: usize, c: usize, dst: &mut [u8]) {
            // SAFETY: the caller guarantees AVX-512F/BW (and AVX2).
            unsafe { pack_avx512(codes, nb, c, dst) }
        }
        unsafe fn block(packed: &[u8], g: Group, c: usize, p0: usize, p1: usize, acc: &mut [i32]) {
            // SAFETY: the caller guarantees AVX-512F/BW (and AVX2).
            unsafe {
                match acc.len() / Self::R {
                    8 => block_avx512::<8>(packed, g, c, p0, p1, acc),
                    7 => block_avx512::<7>(packed, g, c, p0, p1, acc),
                    6 => block_avx512::<6>(packed, g, c, p0, p1, acc),
                    5 => block_avx512::<5>(packed, g, c, p0, p1, acc),
                    4 => block_avx512::<4>(packed, g, c, p0, p1, acc),
                    3 => block_avx512::<3>(packed, g, c, p0, p1, acc),
                    2 => block_avx512::<2>(packed, g, c, p0, p1, acc),
                    1 => block_avx512::<1>(packed, g, c, p0, p1, acc),
                    _ => unreachable!(),
                }
            }
        }
    }

    const _: () = assert!(LAYOUT_OUTPUTS.is_multiple_of(Avx2::MB) && LAYOUT_OUTPUTS.is_multiple_of(Avx512::MB));

    /// Shuffle kernel over `nr` rows (`codes`: `nr × c`, `out`: `nr × m`): packs every block of
    /// rows, then per chunk of `FLUSH_PAIRS` pairs × group of outputs × block of rows sums into the
    /// i32 block results, which are finally transposed into `out`.
    ///
    /// # Safety
    /// The CPU supports `I` (and AVX2).
    #[allow(clippy::too_many_arguments)]
    unsafe fn drive<I: Isa>(
        codes: &[u8],
        nr: usize,
        c: usize,
        t: Tables,
        m: usize,
        cols: Range<usize>,
        out: &mut [i32],
        s: &mut Scratch,
    ) {
        super::check_codes(codes, 16);
        let mw = cols.len();
        assert!(codes.len() == nr * c && t.data.len() == c * m * 16 && out.len() == nr * mw);
        assert!(cols.end <= m && cols.start.is_multiple_of(I::MB));
        let r = I::R;
        let np = c.div_ceil(2);
        let nsb = nr.div_ceil(r);
        // every byte is overwritten by `pack`
        s.packed.resize(nsb * np * r, 0);
        for (sb, dst) in s.packed.chunks_exact_mut(np * r).take(nsb).enumerate() {
            let nb = (nr - sb * r).min(r);
            // SAFETY: the caller guarantees the instruction set.
            unsafe { I::pack(&codes[sb * r * c..(sb * r + nb) * c], nb, c, dst) };
        }
        let acc = &mut s.acc;
        acc.clear();
        acc.resize(nsb * mw * r, 0);
        for p0 in (0..np).step_by(FLUSH_PAIRS) {
            let p1 = (p0 + FLUSH_PAIRS).min(np);
            for mi0 in cols.clone().step_by(I::MB) {
                let (nbo, a0) = ((cols.end - mi0).min(I::MB), mi0 - cols.start);
                let g = t.group(c, m, mi0);
                for (packed, acc) in s
                    .packed
                    .chunks_exact(np * r)
                    .zip(acc.chunks_exact_mut(mw * r))
                    .take(nsb)
                {
                    // SAFETY: the caller guarantees the instruction set.
                    unsafe { I::block(packed, g, c, p0, p1, &mut acc[a0 * r..(a0 + nbo) * r]) };
                }
            }
        }
        for (acc, out) in acc.chunks_exact(mw * r).zip(out.chunks_mut(r * mw)) {
            // SAFETY: the caller guarantees AVX2.
            unsafe { store_rows(acc, r, mw, out.len() / mw, out) };
        }
    }

    /// AVX2 kernel over `nr` rows and outputs `cols` (`codes`: `nr × c`, `out`: `nr ×
    /// cols.len()`; `cols.start` a multiple of 8).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx2_i8(
        codes: &[u8],
        nr: usize,
        c: usize,
        tables: Tables,
        m: usize,
        cols: Range<usize>,
        out: &mut [i32],
        s: &mut Scratch,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { drive::<Avx2>(codes, nr, c, tables, m, cols, out, s) }
    }

    /// AVX-512BW kernel over `nr` rows and outputs `cols` (as [`avx2_i8`]).
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512F and AVX-512BW.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx512_i8(
        codes: &[u8],
        nr: usize,
        c: usize,
        tables: Tables,
        m: usize,
        cols: Range<usize>,
        out: &mut [i32],
        s: &mut Scratch,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { drive::<Avx512>(codes, nr, c, tables, m, cols, out, s) }
    }

    /// Rows per block of the VNNI kernel: four registers of 16 rows.
    const QR: usize = 64;
    /// Outputs per register tile of the VNNI kernel: 6 × 4 i32 accumulators, 4 code registers,
    /// the table register and the ones.
    const QNB: usize = 6;
    /// The same at 64 codes ([`pair_block`]) when a call has two blocks of rows or more, taken
    /// two at a time: 4 × 4 accumulators of 16-bit sums, 4 code and 2 table registers, the
    /// ones. Measured on ResNet-18/16 at 64 codes, batch 64, one thread (Zen 5, the host
    /// busy, three alternated rounds): lookups 13.6–15.5 ms against 13.3–18.1 with
    /// [`QNB_ONE`] outputs of one block (within the noise), NIN's 2.9–4.1 against 3.3–4.7.
    const QNB64: usize = 4;
    /// The same at 128 codes: 2 × 4 accumulators, 4 code and 4 table registers, the ones.
    /// Measured on ResNet-18/16 at 128 codes, batch 64, one thread (Zen 5, the host busy, three
    /// alternated rounds): lookups 22.5–29.2 ms against 31.0–40.9 with [`QNB_ONE`] outputs of
    /// one block, 36.6–50.3 row-wise.
    const QNB128: usize = 2;
    /// Outputs per register tile of [`pair_block`] when a call has one block of rows (few rows,
    /// or outputs split across threads), at 64 and 128 codes: the tables are read once per call
    /// anyway, and wider tiles read the codes fewer times (8 × 2 accumulators, 2 code and up to
    /// 4 table registers, the ones).
    const QNB_ONE: usize = 8;
    /// Codebook `4g + j`'s code at 128 codes: as it is (each codebook has its own pair of
    /// registers).
    const OFFSETS128: i32 = 0;

    /// Packs a block of `nb <= 64` rows (`codes`: `nb × c`) for [`quad_block`] and
    /// [`pair_block`] (after [`quads_to_pairs`]): per group `g` of four codebooks, 256 bytes, row `r`'s four codes at
    /// bytes `4r .. 4r + 4`, codebook `4g + j` ORed with byte `j` of `offsets` (its table's place
    /// among the registers a shuffle reads: [`OFFSETS16`], [`OFFSETS64`], [`OFFSETS128`]).
    /// Missing rows and codebooks: code 0 (missing codebooks' tables are zeros; missing rows' sums are dropped).
    /// Per 16 rows and 16 groups (64 codebooks): one in-register 16×16 transpose of their
    /// 4-code words.
    ///
    /// # Safety
    /// AVX-512F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_quads(codes: &[u8], nb: usize, c: usize, offsets: i32, dst: &mut [u8]) {
        let q = c.div_ceil(4);
        assert!(nb <= QR && codes.len() == nb * c && dst.len() == q * 256);
        let offsets = _mm512_set1_epi32(offsets);
        for rg in 0..QR / 16 {
            let r0 = rg * 16;
            for g0 in (0..q).step_by(16) {
                // the row's codes of codebooks 4·g0 .. 4·g0 + 64 (those past c read as 0, rows
                // past nb as all 0)
                let w = (c - 4 * g0).min(64);
                let mask: __mmask64 = if w == 64 { !0 } else { (1u64 << w) - 1 };
                let rows: [__m512i; 16] = std::array::from_fn(|i| {
                    if r0 + i < nb {
                        // SAFETY: the w bytes from row r0 + i's codebook 4·g0 lie in `codes`.
                        unsafe { _mm512_maskz_loadu_epi8(mask, codes.as_ptr().add((r0 + i) * c + 4 * g0).cast()) }
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                // SAFETY: AVX-512F.
                let cols = unsafe { crate::interp::kernels::transpose16_epi32(rows) };
                for (j, v) in cols.into_iter().enumerate().take(q - g0) {
                    let d = &mut dst[(g0 + j) * 256 + rg * 64..][..64];
                    // SAFETY: d is 64 bytes.
                    unsafe { _mm512_storeu_si512(d.as_mut_ptr().cast(), _mm512_or_si512(v, offsets)) };
                }
            }
        }
    }

    /// Codebook `4g + j`'s code plus `16 j` at 16 codes: its table's place in the 64-byte
    /// register of four tables.
    const OFFSETS16: i32 = 0x3020_1000;
    /// At 64 codes: codebooks `4g` and `4g + 1` share a pair of registers (128 entries,
    /// `vpermi2b`), as do `4g + 2` and `4g + 3`; the second one's code plus 64.
    const OFFSETS64: i32 = 0x4000_4000;

    /// [`quad_block`] at `K` = 64 or 128 codes over `hp` pairs of codebooks (`packed`: per
    /// pair 128 bytes, rows 0–31 then 32–63, row `i`'s two codes as word `i`, at 64 codes the
    /// second plus 64; `t`: per output the pair's two `K`-entry tables, `t_step` bytes between
    /// pairs). At 64 codes, per 32 rows one `vpermi2b` looks up both codebooks of every row in
    /// their 128 entries — 64 lookups per shuffle, every byte used. At 128 codes each
    /// codebook's table fills the two registers a `vpermi2b` reads: one looks up the first
    /// codebook into the even bytes (merge-masked, the odd bytes keep their codes), a second the
    /// other codebook into the odd bytes. Then `vpmaddubsw` (ones × entries) adds each row's
    /// two into a 16-bit lane and `vpaddw` accumulates. At most [`PAIRS_PER_FLUSH`] pairs are
    /// summed in 16 bits (|Σ| ≤ 127 · 256 < 2¹⁵) before they are widened into `acc`
    /// (`[NB][64]` i32 per block): exact. `B` (1 or 2) blocks of 64 rows share each load of
    /// the tables, which a block reads whole (`K / 64` bytes per lookup): two halve that
    /// traffic, which bounds the kernel once the tables outgrow L1.
    ///
    /// # Safety
    /// AVX-512F/BW, VBMI; every block of `packed` holds at least `hp · 128` bytes and
    /// `t + h·t_step + 2·K·NB` is readable for every `h < hp` (codes `≥ K` would read the wrong
    /// entries, never out of bounds).
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi")]
    unsafe fn pair_block<const NB: usize, const K: usize, const B: usize>(
        packed: [&[u8]; B],
        hp: usize,
        t: *const i8,
        t_step: usize,
        mut acc: [&mut [i32]; B],
    ) {
        const EVEN: __mmask64 = 0x5555_5555_5555_5555;
        assert!((K == 64 || K == 128) && (B == 1 || B == 2));
        assert!(packed.iter().all(|p| p.len() >= hp * 128) && acc.iter().all(|a| a.len() == NB * QR));
        let ones = _mm512_set1_epi8(1);
        acc.iter_mut().for_each(|a| a.fill(0));
        for h0 in (0..hp).step_by(PAIRS_PER_FLUSH) {
            // a[n][2b + half]: output n, block b, rows 32·half .. 32·half + 32
            let mut a = [[_mm512_setzero_si512(); 4]; NB];
            for h in h0..(h0 + PAIRS_PER_FLUSH).min(hp) {
                // SAFETY: h < hp and every packed block holds hp · 128 bytes; the caller
                // guarantees the tables.
                unsafe {
                    let x: [__m512i; 4] = std::array::from_fn(|i| {
                        if i < 2 * B {
                            _mm512_loadu_si512(packed[i / 2].as_ptr().add(h * 128 + (i % 2) * 64).cast())
                        } else {
                            _mm512_setzero_si512()
                        }
                    });
                    let th = t.add(h * t_step);
                    for (n, an) in a.iter_mut().enumerate() {
                        let tn = th.add(2 * K * n);
                        let r: [__m512i; 4] = std::array::from_fn(|i| {
                            if i < 2 * K / 64 {
                                _mm512_loadu_si512(tn.add(64 * i).cast())
                            } else {
                                _mm512_setzero_si512()
                            }
                        });
                        for (v, x) in an.iter_mut().zip(x).take(2 * B) {
                            let e = if K == 64 {
                                _mm512_permutex2var_epi8(r[0], x, r[1])
                            } else {
                                // mask2: the bytes outside the mask keep idx's (Intel's
                                // definition; not `a`'s, as Rust's doc says)
                                let e = _mm512_mask2_permutex2var_epi8(r[0], x, EVEN, r[1]);
                                _mm512_mask2_permutex2var_epi8(r[2], e, !EVEN, r[3])
                            };
                            *v = _mm512_add_epi16(*v, _mm512_maddubs_epi16(ones, e));
                        }
                    }
                }
            }
            for (n, an) in a.iter().enumerate() {
                for (i2, v) in an.iter().enumerate().take(2 * B) {
                    let (b, half) = (i2 / 2, i2 % 2);
                    let words = [_mm512_castsi512_si256(*v), _mm512_extracti64x4_epi64::<1>(*v)];
                    for (i, w) in words.into_iter().enumerate() {
                        // SAFETY: acc[b] holds NB · 64 i32.
                        unsafe {
                            let d = acc[b].as_mut_ptr().add(n * QR + half * 32 + i * 16).cast::<__m512i>();
                            _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), _mm512_cvtepi16_epi32(w)));
                        }
                    }
                }
            }
        }
    }

    /// Pairs of codebooks [`pair_block`] sums in 16 bits before widening them.
    const PAIRS_PER_FLUSH: usize = 127;
    // a pair's sum lies in [−256, 254]: PAIRS_PER_FLUSH of them fit an i16
    const _: () = assert!(PAIRS_PER_FLUSH * 256 <= i16::MAX as usize);

    /// Rewrites blocks packed by [`pack_quads`] with [`OFFSETS64`] or [`OFFSETS128`] (per group
    /// of four codebooks, 16 rows × 4 codes per register) into [`pair_block`]'s layout: per group the
    /// first pair's rows 0–31 and 32–63, then the second pair's (one 16-bit two-register
    /// permute per 32 rows and pair).
    ///
    /// # Safety
    /// AVX-512F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quads_to_pairs(packed: &mut [u8]) {
        let even = _mm512_set_epi16(
            62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10,
            8, 6, 4, 2, 0,
        );
        let odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
        for g in packed.chunks_exact_mut(256) {
            let p = g.as_mut_ptr();
            // SAFETY: g is 256 bytes.
            unsafe {
                let r: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(p.add(64 * i).cast()));
                for half in 0..2 {
                    let (a, b) = (r[2 * half], r[2 * half + 1]);
                    _mm512_storeu_si512(p.add(64 * half).cast(), _mm512_permutex2var_epi16(a, even, b));
                    _mm512_storeu_si512(p.add(128 + 64 * half).cast(), _mm512_permutex2var_epi16(a, odd, b));
                }
            }
        }
    }

    /// The sums of every codebook for `NB` outputs (`t`: their quad tables at the first group,
    /// `t_step` bytes between groups) over one packed block of 64 rows, written to `acc`
    /// (`[NB][64]` i32).
    ///
    /// # Safety
    /// AVX-512F/BW, VBMI and VNNI; `packed` holds `q · 256` bytes and `t + g·t_step + 64·NB`
    /// is readable for every `g < q`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi,avx512vnni")]
    unsafe fn quad_block<const NB: usize>(packed: &[u8], q: usize, t: *const i8, t_step: usize, acc: &mut [i32]) {
        assert!(packed.len() == q * 256 && acc.len() == NB * QR);
        let ones = _mm512_set1_epi8(1);
        let mut a = [[_mm512_setzero_si512(); 4]; NB];
        let p = packed.as_ptr();
        for g in 0..q {
            // SAFETY: g < q and packed holds q · 256 bytes; the caller guarantees the tables.
            unsafe {
                let x: [__m512i; 4] = std::array::from_fn(|rg| _mm512_loadu_si512(p.add(g * 256 + rg * 64).cast()));
                let tg = t.add(g * t_step);
                for (n, an) in a.iter_mut().enumerate() {
                    let tv = _mm512_loadu_si512(tg.add(64 * n).cast());
                    for (rg, v) in an.iter_mut().enumerate() {
                        *v = _mm512_dpbusd_epi32(*v, ones, _mm512_permutexvar_epi8(x[rg], tv));
                    }
                }
            }
        }
        for (n, an) in a.iter().enumerate() {
            for (rg, v) in an.iter().enumerate() {
                // SAFETY: acc holds NB · 64 i32.
                unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(n * QR + rg * 16).cast(), *v) };
            }
        }
    }

    /// VNNI kernel over `nr` rows and outputs `cols` (`codes`: `nr × c`, `quads`: the
    /// [`super::quad_tables`], `out`: `nr × cols.len()`): exact i32 sums (at 16 codes each
    /// `vpdpbusd` adds four table entries to a 32-bit lane, at 64 and 128 [`pair_block`] widens
    /// its 16-bit sums; |sum| ≤ 128·c fits, `Call::new` checks `c`).
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512F/BW, VBMI and VNNI.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn vnni_i8(
        codes: &[u8],
        nr: usize,
        c: usize,
        quads: &[i8],
        m: usize,
        k: usize,
        cols: Range<usize>,
        out: &mut [i32],
        s: &mut Scratch,
    ) {
        assert!(out.len() == nr * cols.len());
        // SAFETY: forwarded from the caller.
        unsafe { vnni_sums(codes, nr, c, quads, m, k, cols.clone(), s) };
        for (acc, out) in s.acc.chunks_exact(cols.len() * QR).zip(out.chunks_mut(QR * cols.len())) {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { store_rows512(acc, QR, cols.len(), out.len() / cols.len(), out) };
        }
    }

    /// [`vnni_i8`] over every output with the epilogue `affine` applied to the sums as they are
    /// stored (`r0`: the first row's index in the residual; `out`: `nr × m`, every value
    /// written).
    ///
    /// # Safety
    /// As [`vnni_i8`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn vnni_affine(
        codes: &[u8],
        nr: usize,
        c: usize,
        quads: &[i8],
        m: usize,
        k: usize,
        affine: super::Affine,
        r0: usize,
        out: &mut [std::mem::MaybeUninit<f32>],
        s: &mut Scratch,
    ) {
        assert!(out.len() == nr * m);
        // SAFETY: forwarded from the caller.
        unsafe { vnni_sums(codes, nr, c, quads, m, k, 0..m, s) };
        for (b, (acc, out)) in s.acc.chunks_exact(m * QR).zip(out.chunks_mut(QR * m)).enumerate() {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe { store_affine512(acc, m, out.len() / m, affine, r0 + b * QR, out) };
        }
    }

    /// The sums of `nr` rows (`codes`: `nr × c`) for outputs `cols` into `s.acc`: per block of
    /// [`QR`] rows, `[cols.len()][QR]` i32.
    ///
    /// # Safety
    /// The CPU must support AVX2, AVX-512F/BW, VBMI and VNNI.
    #[allow(clippy::too_many_arguments)]
    unsafe fn vnni_sums(
        codes: &[u8],
        nr: usize,
        c: usize,
        quads: &[i8],
        m: usize,
        k: usize,
        cols: Range<usize>,
        s: &mut Scratch,
    ) {
        assert!(matches!(k, 16 | 64 | 128), "the VNNI kernel takes 16, 64 or 128 codes");
        super::check_codes(codes, k);
        let (q, mw) = (c.div_ceil(4), cols.len());
        assert!(codes.len() == nr * c && quads.len() == super::vnni_tables_len(c, m, k) && cols.end <= m);
        let nsb = nr.div_ceil(QR);
        let Scratch { acc, packed, .. } = s;
        // every byte is overwritten by `pack_quads`
        packed.resize(nsb * q * 256, 0);
        let offsets = match k {
            16 => OFFSETS16,
            64 => OFFSETS64,
            _ => OFFSETS128,
        };
        for (sb, dst) in packed.chunks_exact_mut(q * 256).take(nsb).enumerate() {
            let nb = (nr - sb * QR).min(QR);
            // SAFETY: the caller guarantees AVX-512F/BW.
            unsafe { pack_quads(&codes[sb * QR * c..(sb * QR + nb) * c], nb, c, offsets, dst) };
        }
        if k != 16 {
            // SAFETY: the caller guarantees AVX-512F/BW.
            unsafe { quads_to_pairs(packed) };
        }
        // every value is overwritten by `quad_block` (`pair_block`)
        acc.resize(nsb * mw * QR, 0);
        let (hp, per) = (c.div_ceil(2), super::vnni_group(k));
        let tile = match k {
            16 => QNB,
            _ if nsb == 1 => QNB_ONE,
            64 => QNB64,
            _ => QNB128,
        };
        let step = m * per * k;
        for mi0 in cols.clone().step_by(tile) {
            let (nbo, a0) = ((cols.end - mi0).min(tile), mi0 - cols.start);
            let t = quads[mi0 * per * k..].as_ptr();
            let mut blocks = packed
                .chunks_exact(q * 256)
                .zip(acc.chunks_exact_mut(mw * QR))
                .take(nsb)
                .map(|(p, acc)| (p, &mut acc[a0 * QR..(a0 + nbo) * QR]));
            if k == 16 {
                for (packed, acc) in blocks {
                    // SAFETY: the caller guarantees the instruction sets; group g of outputs
                    // mi0 .. mi0 + nbo is at (g·m + mi0)·4·16, within quads.
                    unsafe {
                        match nbo {
                            6 => quad_block::<6>(packed, q, t, step, acc),
                            5 => quad_block::<5>(packed, q, t, step, acc),
                            4 => quad_block::<4>(packed, q, t, step, acc),
                            3 => quad_block::<3>(packed, q, t, step, acc),
                            2 => quad_block::<2>(packed, q, t, step, acc),
                            1 => quad_block::<1>(packed, q, t, step, acc),
                            _ => unreachable!(),
                        }
                    }
                }
                continue;
            }
            // two blocks at a time (a last one alone)
            while let Some((p0, acc0)) = blocks.next() {
                // SAFETY: the caller guarantees the instruction sets; pair h of outputs
                // mi0 .. mi0 + nbo is at (h·m + mi0)·2·k, within quads.
                unsafe {
                    match blocks.next() {
                        Some((p1, acc1)) => pair_call::<2>(k, nbo, [p0, p1], hp, t, step, [acc0, acc1]),
                        None => pair_call::<1>(k, nbo, [p0], hp, t, step, [acc0]),
                    }
                }
            }
        }
    }

    /// [`pair_block`] at `k` codes for `nbo ≤ QNB_ONE` outputs.
    ///
    /// # Safety
    /// As [`pair_block`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn pair_call<const B: usize>(
        k: usize,
        nbo: usize,
        packed: [&[u8]; B],
        hp: usize,
        t: *const i8,
        step: usize,
        acc: [&mut [i32]; B],
    ) {
        macro_rules! by_outputs {
            ($k:literal) => {
                match nbo {
                    8 => pair_block::<8, $k, B>,
                    7 => pair_block::<7, $k, B>,
                    6 => pair_block::<6, $k, B>,
                    5 => pair_block::<5, $k, B>,
                    4 => pair_block::<4, $k, B>,
                    3 => pair_block::<3, $k, B>,
                    2 => pair_block::<2, $k, B>,
                    1 => pair_block::<1, $k, B>,
                    n => unreachable!("{n} outputs per tile"),
                }
            };
        }
        let f = match k {
            64 => by_outputs!(64),
            128 => by_outputs!(128),
            k => unreachable!("pairs of codebooks of {k} codes"),
        };
        // SAFETY: forwarded from the caller.
        unsafe { f(packed, hp, t, step, acc) }
    }

    /// [`store_rows512`] of one block's sums (`acc`: `[m][QR]`) as `nb` rows of `m` outputs
    /// (row `i` of the block is row `r0 + i` of the residual) through `affine`: per 16 rows
    /// and 16 outputs one transpose, then the epilogue on whole rows of 16 (the same separately
    /// rounded operations as [`super::Affine::one`], which does the rows and outputs past the
    /// last whole tile).
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_affine512(
        acc: &[i32],
        m: usize,
        nb: usize,
        affine: super::Affine,
        r0: usize,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        assert!(nb <= QR && acc.len() == m * QR && out.len() == nb * m);
        assert!(affine.scale.len() == m && affine.offset.len() == m);
        if let Some(r) = affine.residual {
            assert!(r.len() >= (r0 + nb) * m);
        }
        let (r16, m16) = (nb / 16 * 16, m / 16 * 16);
        let zero = _mm512_setzero_ps();
        for i0 in (0..r16).step_by(16) {
            for m0 in (0..m16).step_by(16) {
                // SAFETY: output m0 + i's rows i0 .. i0 + 16 lie in acc.
                let v: [__m512i; 16] =
                    std::array::from_fn(|i| unsafe { _mm512_loadu_si512(acc.as_ptr().add((m0 + i) * QR + i0).cast()) });
                // SAFETY: AVX-512F; the scale and offset hold outputs m0 .. m0 + 16.
                let (t, scale, offset) = unsafe {
                    (
                        crate::interp::kernels::transpose16_epi32(v),
                        _mm512_loadu_ps(affine.scale.as_ptr().add(m0)),
                        _mm512_loadu_ps(affine.offset.as_ptr().add(m0)),
                    )
                };
                for (q, w) in t.into_iter().enumerate() {
                    let mut y = _mm512_add_ps(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(w)), offset);
                    if let Some(r) = affine.residual {
                        // SAFETY: row r0 + i0 + q's outputs m0 .. m0 + 16 lie in the residual.
                        y = _mm512_add_ps(y, unsafe { _mm512_loadu_ps(r.as_ptr().add((r0 + i0 + q) * m + m0)) });
                    }
                    if affine.relu {
                        // max(y, 0) returns its second operand when y is NaN or either zero
                        y = _mm512_max_ps(y, zero);
                    }
                    let d = &mut out[(i0 + q) * m + m0..][..16];
                    // SAFETY: d is 16 floats.
                    unsafe { _mm512_storeu_ps(d.as_mut_ptr().cast(), y) };
                }
            }
            for j in m16..m {
                for i in i0..i0 + 16 {
                    out[i * m + j].write(affine.one(r0 + i, j, acc[j * QR + i] as f32));
                }
            }
        }
        for i in r16..nb {
            for j in 0..m {
                out[i * m + j].write(affine.one(r0 + i, j, acc[j * QR + i] as f32));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_codes(rng: &mut Rng, n: usize, k: usize) -> Vec<u8> {
        (0..n).map(|_| rng.below(k) as u8).collect()
    }

    fn naive_i8(codes: &[u8], rows: usize, c: usize, tables: &[i8], m: usize, k: usize) -> Vec<i32> {
        let mut out = vec![0i32; rows * m];
        for r in 0..rows {
            for mi in 0..m {
                out[r * m + mi] = (0..c)
                    .map(|ci| tables[(ci * m + mi) * k + codes[r * c + ci] as usize] as i32)
                    .sum();
            }
        }
        out
    }

    #[derive(Clone, Copy, Debug)]
    enum Fill {
        Random,
        Min,
        Max,
    }

    fn tables_i8(rng: &mut Rng, n: usize, fill: Fill) -> Vec<i8> {
        match fill {
            Fill::Random => (0..n).map(|_| rng.next() as i8).collect(),
            Fill::Min => vec![-128; n],
            Fill::Max => vec![127; n],
        }
    }

    /// The LUT kernels a test runs: every one this CPU has (`kernels::report_checked`).
    fn kernels_checked(test: &str) -> Vec<LutKernel> {
        let all = [LutKernel::Scalar, LutKernel::Avx2, LutKernel::Avx512, LutKernel::Vnni];
        crate::interp::kernels::report_checked(test, "LUT kernels", &all, LutKernel::supported, LutKernel::name)
    }

    /// The row-wise kernel (few rows, `[c][k][m]` tables) equals the naive sum exactly: i16
    /// flushes past 256 codebooks, extreme tables, K = 16, 64 and 256, the parallel output tiles.
    #[test]
    fn rowwise_matches_naive() {
        let levels = crate::interp::kernels::levels_checked("rowwise_matches_naive");
        let mut rng = Rng(77);
        let cases = [
            (1, 64, 64, 16, Fill::Random),
            (7, 300, 33, 16, Fill::Min),
            (5, 513, 40, 16, Fill::Max),
            (32, 20, 17, 256, Fill::Random),
            (3, 1, 5, 16, Fill::Random),
            (8, 512, 300, 16, Fill::Random), // rows·c·m ≥ 2^18: output tiles in parallel (with threads)
            (2, 600, 9, 256, Fill::Min),
            (3, 300, 200, 16, Fill::Max),     // register tiles of 128 and 64, scalar tail
            (200, 20, 48, 256, Fill::Random), // parallel row blocks (`_then`); AVX2 tail at AVX-512
            (130, 300, 16, 256, Fill::Max),
            (65, 7, 90, 256, Fill::Min),
            (4, 40, 112, 16, Fill::Random), // AVX2 word tiles of 3 registers and a 16-output tail
            (3, 270, 96, 16, Fill::Max),    // ... of 3 registers, two flushes, prefetched
            (100, 50, 48, 64, Fill::Random), // K = 64 runs row-wise at any number of rows
            (70, 300, 33, 64, Fill::Max),
        ];
        for (rows, c, m, k, fill) in cases {
            let codes = random_codes(&mut rng, rows * c, k);
            let tables = tables_i8(&mut rng, c * m * k, fill);
            let want = naive_i8(&codes, rows, c, &tables, m, k);
            let tt = transpose_tables(&tables, c, m, k);
            for &level in &levels {
                let mut got = vec![0i32; rows * m];
                lut_i8_rowwise_at(level, &codes, rows, c, &tt, m, k, &mut got);
                assert_eq!(got, want, "rows={rows} c={c} m={m} k={k} {fill:?} {level:?}");
                // with an epilogue (here: the sums of each block plus its first row's index)
                let mut got = vec![i32::MIN; rows * m];
                lut_i8_rowwise_then(level, &codes, rows, c, &tt, m, k, &mut got, |r0, sums, out| {
                    assert_eq!(sums.len(), out.len());
                    for (o, &v) in out.iter_mut().zip(sums) {
                        *o = v + r0 as i32;
                    }
                });
                for (r, (g, w)) in got.chunks(m).zip(want.chunks(m)).enumerate() {
                    let r0 = r / ROWWISE_PAR_ROWS * ROWWISE_PAR_ROWS * (rows > ROWWISE_PAR_ROWS) as usize;
                    let w: Vec<i32> = w.iter().map(|&v| v + r0 as i32).collect();
                    assert_eq!(
                        g,
                        &w[..],
                        "then: row {r} rows={rows} c={c} m={m} k={k} {fill:?} {level:?}"
                    );
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_all_kernels(kernels: &[LutKernel], rng: &mut Rng, rows: usize, c: usize, m: usize, k: usize, fill: Fill) {
        let codes = random_codes(rng, rows * c, k);
        let tables = tables_i8(rng, c * m * k, fill);
        let want = naive_i8(&codes, rows, c, &tables, m, k);
        for &kernel in kernels {
            let mut out = vec![i32::MIN; rows * m];
            lut_i8_with(kernel, &codes, rows, c, &tables, m, k, &mut out);
            if let Some(i) = (0..out.len()).find(|&i| out[i] != want[i]) {
                panic!(
                    "{} rows={rows} c={c} m={m} k={k} {fill:?}: out[{i}] (row {}, output {}) = {} != {}",
                    kernel.name(),
                    i / m,
                    i % m,
                    out[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn i8_kernels_match_naive_k16() {
        let kernels = kernels_checked("i8_kernels_match_naive_k16");
        let mut rng = Rng(1);
        for rows in [1, 31, 32, 33, 64, 65, 200, 1000] {
            for c in [1, 2, 3, 16, 17, 300, 512] {
                for m in [1, 5, 16, 33] {
                    let fill = match rng.below(4) {
                        0 => Fill::Min,
                        1 => Fill::Max,
                        _ => Fill::Random,
                    };
                    check_all_kernels(&kernels, &mut rng, rows, c, m, 16, fill);
                }
            }
        }
    }

    /// At 64 and 128 codes (the VNNI kernel's pairs of codebooks, where the CPU has it): odd
    /// and even codebook counts, 16-bit sums flushed past 254 codebooks, partial output tiles,
    /// rows past whole blocks of 64, extreme tables; on one thread, tasks of 256 rows, whose
    /// blocks of 64 rows the kernel takes two at a time, and a last one of three blocks (the
    /// third alone).
    #[test]
    fn i8_kernels_match_naive_k64_k128() {
        let kernels = kernels_checked("i8_kernels_match_naive_k64_k128");
        let mut rng = Rng(64);
        let fill = |rng: &mut Rng| match rng.below(4) {
            0 => Fill::Min,
            1 => Fill::Max,
            _ => Fill::Random,
        };
        for k in [64, 128] {
            for rows in [1, 33, 64, 65, 200] {
                for c in [1, 2, 3, 5, 48, 254, 255, 300, 513] {
                    for m in [1, 7, 8, 9, 16, 33] {
                        let f = fill(&mut rng);
                        check_all_kernels(&kernels, &mut rng, rows, c, m, k, f);
                    }
                }
            }
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            for (c, m) in [(3, 5), (48, 16), (255, 9)] {
                let f = fill(&mut rng);
                one.install(|| check_all_kernels(&kernels, &mut rng, 700, c, m, k, f));
            }
        }
    }

    /// With fewer row blocks than threads, `lut_i8_then` splits the outputs across threads
    /// (column tiles, a partial last one) and hands the epilogue the same sums, at 16, 64 and
    /// 128 codes.
    #[test]
    fn then_splits_outputs_when_rows_are_few() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut rng = Rng(12);
        // m = 64 and 48 split into tiles of 32 (+ 16) outputs, the others into COL_TILEs
        let cases = [
            (64, 256, 512),
            (40, 300, 200),
            (1, 1024, 1030),
            (64, 64, 64),
            (49, 144, 64),
            (64, 96, 48),
        ];
        for (k, (rows, c, m)) in [16, 64, 128].into_iter().flat_map(|k| cases.map(|cs| (k, cs))) {
            let codes = random_codes(&mut rng, rows * c, k);
            let tables = tables_i8(&mut rng, c * m * k, Fill::Random);
            let want = naive_i8(&codes, rows, c, &tables, m, k);
            let mut got = vec![0i64; rows * m];
            pool.install(|| {
                lut_i8_then(&codes, rows, c, &tables, None, m, k, &mut got, |r0, sums, out| {
                    assert_eq!(r0, 0, "one block");
                    for (o, &v) in out.iter_mut().zip(sums) {
                        *o = v as i64 + 1;
                    }
                })
            });
            let want: Vec<i64> = want.iter().map(|&v| v as i64 + 1).collect();
            assert_eq!(got, want, "k={k} rows={rows} c={c} m={m}");
        }
    }

    /// `lut_i8_affine` (on a VNNI CPU the kernel applies the epilogue as it stores its sums,
    /// elsewhere `Affine::apply` per block) gives the bits of `Affine::one` over the exact sums,
    /// at 16, 64 and 128 codes: outputs and rows past whole tiles
    /// of 16, several blocks of 64 rows and tasks, a residual from the right row, zeros of both
    /// signs through the ReLU, one and two threads.
    #[test]
    fn affine_epilogue_gives_the_bits_of_its_scalar_form() {
        let mut rng = Rng(21);
        let val = |rng: &mut Rng| (rng.below(2001) as f32 - 1000.0) / 333.0;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let cases = [
                (1, 36, 16),
                (15, 20, 16),
                (49, 144, 64),
                (64, 9, 20),
                (100, 72, 48),
                (300, 36, 70),
                (1024, 36, 16),
            ];
            for (k, (rows, c, m)) in [16, 64, 128].into_iter().flat_map(|k| cases.map(|cs| (k, cs))) {
                let codes = random_codes(&mut rng, rows * c, k);
                let tables = tables_i8(&mut rng, c * m * k, Fill::Random);
                let sums = naive_i8(&codes, rows, c, &tables, m, k);
                let mut scale: Vec<f32> = (0..m).map(|_| val(&mut rng) / 100.0).collect();
                let mut offset: Vec<f32> = (0..m).map(|_| val(&mut rng)).collect();
                (scale[0], offset[0], scale[1], offset[1]) = (0.0, -0.0, -0.0, -0.0);
                let residual: Vec<f32> = (0..rows * m).map(|_| val(&mut rng)).collect();
                for relu in [false, true] {
                    for res in [None, Some(&residual[..])] {
                        let affine = Affine {
                            scale: &scale,
                            offset: &offset,
                            residual: res,
                            relu,
                        };
                        let want: Vec<u32> = (0..rows * m)
                            .map(|i| affine.one(i / m, i % m, sums[i] as f32).to_bits())
                            .collect();
                        let mut y: Vec<f32> = Vec::with_capacity(rows * m);
                        pool.install(|| {
                            lut_i8_affine(&codes, rows, c, &tables, None, m, k, affine, y.spare_capacity_mut())
                        });
                        // SAFETY: lut_i8_affine writes every value (else `want` differs).
                        unsafe { y.set_len(rows * m) };
                        let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                            panic!(
                                "{threads} threads k={k} rows={rows} c={c} m={m} relu={relu} residual={}: row {} output {}: {} != {}",
                                res.is_some(),
                                i / m,
                                i % m,
                                f32::from_bits(got[i]),
                                f32::from_bits(want[i])
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn i8_kernels_extreme_tables_k16() {
        let kernels = kernels_checked("i8_kernels_extreme_tables_k16");
        // All-(-128) and all-127 tables at the largest c: the i16 accumulators must be flushed.
        let mut rng = Rng(2);
        for fill in [Fill::Min, Fill::Max] {
            for (rows, c, m) in [
                (65, 300, 5),
                (33, 512, 3),
                (300, 255, 4),
                (64, 254, 1),
                (1, 257, 2),
                (40, 3, 7),
            ] {
                check_all_kernels(&kernels, &mut rng, rows, c, m, 16, fill);
            }
        }
    }

    #[test]
    fn i8_kernels_relaid_tables() {
        let kernels = kernels_checked("i8_kernels_relaid_tables");
        // m % 256 == 0 with rows >= RELAYOUT_MIN_ROWS takes the relaid-table path.
        let mut rng = Rng(6);
        for (rows, c) in [(512, 3), (513, 17), (600, 300)] {
            check_all_kernels(&kernels, &mut rng, rows, c, 256, 16, Fill::Random);
        }
        check_all_kernels(&kernels, &mut rng, 520, 255, 256, 16, Fill::Min);
    }

    /// The relaid layout is correct for any m (the public path only uses it for m % 256 == 0).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn relaid_tables_any_m() {
        let kernels = kernels_checked("relaid_tables_any_m");
        let mut rng = Rng(7);
        for (rows, c, m) in [(70, 5, 13), (100, 33, 8), (1, 2, 1)] {
            let codes = random_codes(&mut rng, rows * c, 16);
            let tables = tables_i8(&mut rng, c * m * 16, Fill::Random);
            let want = naive_i8(&codes, rows, c, &tables, m, 16);
            let relaid = x86::relayout(&tables, c, m);
            let t = x86::Tables {
                data: &relaid,
                relaid: true,
            };
            for &kernel in &kernels {
                let mut out = vec![0; rows * m];
                let mut s = Scratch::default();
                match kernel {
                    // SAFETY: `available()` only lists kernels this CPU supports.
                    LutKernel::Avx2 => unsafe { x86::avx2_i8(&codes, rows, c, t, m, 0..m, &mut out, &mut s) },
                    // SAFETY: as above.
                    LutKernel::Avx512 => unsafe { x86::avx512_i8(&codes, rows, c, t, m, 0..m, &mut out, &mut s) },
                    // no relaid tables: scalar, and the quad layout (tested with the others)
                    LutKernel::Scalar | LutKernel::Vnni => continue,
                }
                assert_eq!(out, want, "{} rows={rows} c={c} m={m}", kernel.name());
            }
        }
    }

    #[test]
    fn i8_other_k_use_scalar() {
        let kernels = kernels_checked("i8_other_k_use_scalar");
        let mut rng = Rng(3);
        for k in [256, 7, 1, 17] {
            for (rows, c, m) in [(1, 1, 1), (33, 3, 5), (200, 17, 16), (300, 64, 33)] {
                for fill in [Fill::Random, Fill::Min, Fill::Max] {
                    check_all_kernels(&kernels, &mut rng, rows, c, m, k, fill);
                }
            }
        }
    }

    /// k = 256 (the VBMI kernel where the CPU has it): partial blocks of 64 rows, odd `c`, more
    /// than one flush of the i16 sums (c > 128), extreme tables, codes all ≥ 128 or all < 128.
    #[test]
    fn i8_kernels_match_naive_k256() {
        let kernels = kernels_checked("i8_kernels_match_naive_k256");
        let mut rng = Rng(8);
        for rows in [1, 63, 64, 65, 130, 256, 257, 700] {
            for c in [1, 2, 3, 129, 300] {
                for m in [1, 3, 16] {
                    let fill = [Fill::Random, Fill::Min, Fill::Max][rng.below(3)];
                    check_all_kernels(&kernels, &mut rng, rows, c, m, 256, fill);
                }
            }
        }
        for (lo, hi) in [(0u8, 127u8), (128, 255), (127, 128)] {
            let (rows, c, m) = (100, 5, 7);
            let codes: Vec<u8> = (0..rows * c)
                .map(|_| lo + rng.below((hi - lo) as usize + 1) as u8)
                .collect();
            let tables = tables_i8(&mut rng, c * m * 256, Fill::Random);
            let want = naive_i8(&codes, rows, c, &tables, m, 256);
            for &kernel in &kernels {
                let mut out = vec![0; rows * m];
                lut_i8_with(kernel, &codes, rows, c, &tables, m, 256, &mut out);
                assert_eq!(out, want, "{} codes {lo}..={hi}", kernel.name());
            }
        }
    }

    #[test]
    fn i8_degenerate_shapes() {
        for kernel in kernels_checked("i8_degenerate_shapes") {
            let mut out = vec![7i32; 6];
            lut_i8_with(kernel, &[], 3, 0, &[], 2, 16, &mut out);
            assert_eq!(out, vec![0; 6]);
            let mut out: Vec<i32> = vec![];
            lut_i8_with(kernel, &[0; 8], 4, 2, &[], 0, 16, &mut out);
            lut_i8_with(kernel, &[], 0, 2, &[0; 64], 2, 16, &mut out);
        }
        let mut out = vec![7.0f32; 6];
        lut_f32(&[], 3, 0, &[], 2, 16, &mut out);
        assert_eq!(out, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn i8_rejects_code_out_of_range() {
        let mut out = vec![0i32; 2];
        lut_i8(&[3, 16], 1, 2, &[0; 64], 2, 16, &mut out);
    }

    #[test]
    #[should_panic(expected = "tables.len()")]
    fn i8_rejects_bad_table_length() {
        let mut out = vec![0i32; 2];
        lut_i8(&[3, 1], 1, 2, &[0; 63], 2, 16, &mut out);
    }

    #[test]
    fn detect_is_available() {
        let avail = LutKernel::available();
        assert!(avail.contains(&LutKernel::Scalar));
        assert!(avail.contains(&LutKernel::detect()));
    }

    #[test]
    fn f32_matches_naive_and_is_deterministic() {
        let mut rng = Rng(4);
        for (rows, c, m, k) in [
            (1, 1, 1, 16),
            (33, 3, 5, 16),
            (300, 17, 16, 256),
            (1000, 64, 33, 7),
            (65, 512, 4, 16),
        ] {
            let codes = random_codes(&mut rng, rows * c, k);
            let tables: Vec<f32> = (0..c * m * k)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect();
            let mut out = vec![f32::NAN; rows * m];
            lut_f32(&codes, rows, c, &tables, m, k, &mut out);
            for r in 0..rows {
                for mi in 0..m {
                    let terms = (0..c).map(|ci| tables[(ci * m + mi) * k + codes[r * c + ci] as usize] as f64);
                    let want: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum::<f64>().max(1e-30);
                    let got = out[r * m + mi] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale,
                        "rows={rows} c={c} m={m} k={k} ({r},{mi}): {got} vs {want}"
                    );
                }
            }
            let mut again = vec![0.0f32; rows * m];
            lut_f32(&codes, rows, c, &tables, m, k, &mut again);
            assert!(out.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()));
            // codebook order: the exact f32 left fold of the terms
            let r = rows - 1;
            let fold = (0..c).fold(0.0f32, |s, ci| s + tables[ci * m * k + codes[r * c + ci] as usize]);
            assert_eq!(fold.to_bits(), out[r * m].to_bits());
        }
    }

    /// The calling thread's CPU time in seconds.
    fn thread_cpu_secs() -> f64 {
        #[cfg(unix)]
        {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid, writable timespec.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        }
        #[cfg(not(unix))]
        f64::NAN
    }

    /// Median time of `runs` calls (after one warm-up call): wall-clock, or with `cpu` the calling
    /// thread's CPU time (meaningful for single-threaded runs on a loaded machine).
    fn median_secs(runs: usize, cpu: bool, mut f: impl FnMut()) -> f64 {
        f();
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let (wall, cpu0) = (std::time::Instant::now(), thread_cpu_secs());
                f();
                if cpu {
                    thread_cpu_secs() - cpu0
                } else {
                    wall.elapsed().as_secs_f64()
                }
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[runs / 2]
    }

    /// Rates (per second, in G) of `work` units for: wall time with all threads, wall time on one
    /// thread, CPU time on one thread.
    fn rates(work: f64, runs: usize, one: &rayon::ThreadPool, mut f: impl FnMut() + Send) -> String {
        let all = median_secs(runs, false, &mut f);
        let (wall1, cpu1) = one.install(|| (median_secs(runs, false, &mut f), median_secs(runs, true, &mut f)));
        let g = |t: f64| work / t / 1e9;
        format!("{:>7.2} G | {:>7.2} G | {:>7.2} G", g(all), g(wall1), g(cpu1))
    }

    /// `cargo test --release --lib lut_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn lut_throughput() {
        use crate::interp::kernels::gemm::{matmul, Mat};
        let (rows, c, m, runs) = (16384, 64, 64, 9);
        let lookups = (rows * c * m) as f64;
        let mut rng = Rng(5);
        let threads = rayon::current_num_threads();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        println!("rows={rows} c={c} m={m}, median of {runs} runs");
        println!("lookups/s: wall {threads} threads | wall 1 thread | CPU time 1 thread");
        for k in [16, 64, 128, 256] {
            let codes = random_codes(&mut rng, rows * c, k);
            let tables = tables_i8(&mut rng, c * m * k, Fill::Random);
            let mut out = vec![0i32; rows * m];
            for kernel in LutKernel::available() {
                let r = rates(lookups, runs, &one, || {
                    lut_i8_with(kernel, &codes, rows, c, &tables, m, k, std::hint::black_box(&mut out))
                });
                println!("  i8  k={k:<3} {:<7} {r}", kernel.name());
            }
            // the row-wise kernel (vectorized over outputs) on the same rows, one thread
            let tt = transpose_tables(&tables, c, m, k);
            for level in Simd::available() {
                let t = one.install(|| {
                    median_secs(runs, true, || {
                        lut_i8_rowwise_at(level, &codes, rows, c, &tt, m, k, std::hint::black_box(&mut out))
                    })
                });
                println!(
                    "  i8  k={k:<3} rowwise {:<7}  CPU time 1 thread {:>7.2} G",
                    level.name(),
                    lookups / t / 1e9
                );
            }
            let tables: Vec<f32> = tables.iter().map(|&v| v as f32).collect();
            let mut out = vec![0f32; rows * m];
            let r = rates(lookups, runs, &one, || {
                lut_f32(&codes, rows, c, &tables, m, k, std::hint::black_box(&mut out))
            });
            println!("  f32 k={k:<3} {:<7} {r}", "scalar");
        }
        // The dense layer a PQ layer replaces: a 3×3 convolution as im2col GEMM, rows × (c·9) × m.
        let kk = c * 9;
        let a: Vec<f32> = (0..rows * kk).map(|i| (i % 97) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..kk * m).map(|i| (i % 89) as f32 * 0.01).collect();
        let mut out = vec![0f32; rows * m];
        let macs = (rows * kk * m) as f64;
        let (a, b) = (Mat::row_major(&a, kk), Mat::row_major(&b, m));
        let r = rates(macs, runs, &one, || {
            matmul(rows, m, kk, a, b, std::hint::black_box(&mut out), m, false, 1.0, true)
        });
        println!("MAC/s:\n  f32 GEMM {rows}x{kk}x{m}  {r}");
        #[cfg(target_arch = "x86_64")]
        shuffle_limits();
        // k = 64 at the shapes of ResNet-18/16's layers over 3-value codebooks (a sub-batch of
        // 16 images) and NIN's, one thread
        println!("k=64, ResNet-18/16 3-value codebook and NIN shapes, lookups/s, CPU time 1 thread:");
        let k64 = [
            (16 * 1024, 48, 16),
            (16 * 256, 96, 32),
            (16 * 64, 192, 64),
            (16 * 16, 384, 128),
            (16 * 784, 48, 96),
            (16 * 784, 24, 96),
            (16 * 196, 10, 10),
        ];
        shape_rates(64, &k64, runs, &one, &mut rng);
        println!("k=128, the same shapes:");
        shape_rates(128, &k64, runs, &one, &mut rng);
        // k = 256 at the shapes of the ResNet-18 fixture's layers (rows at batch 8), one thread
        println!("k=256, ResNet-18 fixture shapes at batch 8, lookups/s, CPU time 1 thread:");
        let k256 = [
            (8 * 784, 16, 16),
            (8 * 196, 32, 32),
            (8 * 49, 64, 64),
            (8 * 16, 128, 128),
            (16384, 2, 16),
            (16384, 8, 8),
        ];
        shape_rates(256, &k256, runs, &one, &mut rng);
    }

    /// One line per `(rows, c, m)` shape at `k` codes: every lookup kernel's and every SIMD
    /// level's row-wise lookups per second, one thread (CPU time).
    fn shape_rates(k: usize, shapes: &[(usize, usize, usize)], runs: usize, one: &rayon::ThreadPool, rng: &mut Rng) {
        for &(rows, c, m) in shapes {
            let lookups = (rows * c * m) as f64;
            let codes = random_codes(rng, rows * c, k);
            let tables = tables_i8(rng, c * m * k, Fill::Random);
            let tt = transpose_tables(&tables, c, m, k);
            let mut out = vec![0i32; rows * m];
            let mut line = format!("  rows={rows:<5} c={c:<3} m={m:<3}");
            for kernel in LutKernel::available() {
                let t = one.install(|| {
                    median_secs(runs, true, || {
                        lut_i8_with(kernel, &codes, rows, c, &tables, m, k, std::hint::black_box(&mut out))
                    })
                });
                line += &format!(" | {} {:.1} G", kernel.name(), lookups / t / 1e9);
            }
            for level in Simd::available() {
                let t = one.install(|| {
                    median_secs(runs, true, || {
                        let o = std::hint::black_box(&mut out);
                        lut_i8_rowwise_then(level, &codes, rows, c, &tt, m, k, o, |_, s, o| o.copy_from_slice(s))
                    })
                });
                line += &format!(" | rowwise {} {:.1} G", level.name(), lookups / t / 1e9);
            }
            println!("{line}");
        }
    }

    /// The machine's shuffle limits, one thread: independent `vpermi2b` zmm and `vpshufb` zmm/ymm
    /// per second, and a chain of dependent scalar adds (one per cycle: the clock).
    #[cfg(target_arch = "x86_64")]
    fn shuffle_limits() {
        use std::arch::asm;
        const N: u64 = 20_000_000;
        let time = |f: &dyn Fn()| {
            let t = median_secs(5, true, f);
            (N * 12) as f64 / t / 1e9
        };
        let adds = time(&|| unsafe {
            asm!("2:", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                 "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                 "dec {n}", "jnz 2b", n = inout(reg) N => _, x = inout(reg) 0u64 => _, options(nomem, nostack));
        });
        println!("dependent scalar adds: {adds:.2} G/s (≈ clock in GHz)");
        if LutKernel::Avx512.supported() && vbmi_supported() {
            let perm = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13",
                     "2:",
                     "vpermi2b zmm0, zmm12, zmm13", "vpermi2b zmm1, zmm12, zmm13", "vpermi2b zmm2, zmm12, zmm13",
                     "vpermi2b zmm3, zmm12, zmm13", "vpermi2b zmm4, zmm12, zmm13", "vpermi2b zmm5, zmm12, zmm13",
                     "vpermi2b zmm6, zmm12, zmm13", "vpermi2b zmm7, zmm12, zmm13", "vpermi2b zmm8, zmm12, zmm13",
                     "vpermi2b zmm9, zmm12, zmm13", "vpermi2b zmm10, zmm12, zmm13", "vpermi2b zmm11, zmm12, zmm13",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, out("zmm13") _, options(nomem, nostack));
            });
            println!(
                "vpermi2b zmm: {perm:.2} G/s ({:.2} per cycle, {:.1} G byte lookups/s)",
                perm / adds,
                perm * 64.0
            );
            let shuf = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12",
                     "2:",
                     "vpshufb zmm0, zmm12, zmm0", "vpshufb zmm1, zmm12, zmm1", "vpshufb zmm2, zmm12, zmm2",
                     "vpshufb zmm3, zmm12, zmm3", "vpshufb zmm4, zmm12, zmm4", "vpshufb zmm5, zmm12, zmm5",
                     "vpshufb zmm6, zmm12, zmm6", "vpshufb zmm7, zmm12, zmm7", "vpshufb zmm8, zmm12, zmm8",
                     "vpshufb zmm9, zmm12, zmm9", "vpshufb zmm10, zmm12, zmm10", "vpshufb zmm11, zmm12, zmm11",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, options(nomem, nostack));
            });
            println!("vpshufb zmm: {shuf:.2} G/s ({:.2} per cycle)", shuf / adds);
            // the other instructions of the VBMI kernel's loop: merge-masked vpermi2b, the byte
            // blend and vpmaddubsw
            let masked = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13",
                     "mov {m}, 0x5555555555555555", "kmovq k1, {m}",
                     "2:",
                     "vpermi2b zmm0{{k1}}, zmm12, zmm13", "vpermi2b zmm1{{k1}}, zmm12, zmm13", "vpermi2b zmm2{{k1}}, zmm12, zmm13",
                     "vpermi2b zmm3{{k1}}, zmm12, zmm13", "vpermi2b zmm4{{k1}}, zmm12, zmm13", "vpermi2b zmm5{{k1}}, zmm12, zmm13",
                     "vpermi2b zmm6{{k1}}, zmm12, zmm13", "vpermi2b zmm7{{k1}}, zmm12, zmm13", "vpermi2b zmm8{{k1}}, zmm12, zmm13",
                     "vpermi2b zmm9{{k1}}, zmm12, zmm13", "vpermi2b zmm10{{k1}}, zmm12, zmm13", "vpermi2b zmm11{{k1}}, zmm12, zmm13",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _, m = out(reg) _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, out("zmm13") _, out("k1") _, options(nomem, nostack));
            });
            println!(
                "vpermi2b zmm{{k}} (merge-masked): {masked:.2} G/s ({:.2} per cycle)",
                masked / adds
            );
            let blend = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12",
                     "mov {m}, 0x5555555555555555", "kmovq k1, {m}",
                     "2:",
                     "vpblendmb zmm0{{k1}}, zmm12, zmm0", "vpblendmb zmm1{{k1}}, zmm12, zmm1", "vpblendmb zmm2{{k1}}, zmm12, zmm2",
                     "vpblendmb zmm3{{k1}}, zmm12, zmm3", "vpblendmb zmm4{{k1}}, zmm12, zmm4", "vpblendmb zmm5{{k1}}, zmm12, zmm5",
                     "vpblendmb zmm6{{k1}}, zmm12, zmm6", "vpblendmb zmm7{{k1}}, zmm12, zmm7", "vpblendmb zmm8{{k1}}, zmm12, zmm8",
                     "vpblendmb zmm9{{k1}}, zmm12, zmm9", "vpblendmb zmm10{{k1}}, zmm12, zmm10", "vpblendmb zmm11{{k1}}, zmm12, zmm11",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _, m = out(reg) _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, out("k1") _, options(nomem, nostack));
            });
            println!("vpblendmb zmm: {blend:.2} G/s ({:.2} per cycle)", blend / adds);
            let madd = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12",
                     "2:",
                     "vpmaddubsw zmm0, zmm12, zmm0", "vpmaddubsw zmm1, zmm12, zmm1", "vpmaddubsw zmm2, zmm12, zmm2",
                     "vpmaddubsw zmm3, zmm12, zmm3", "vpmaddubsw zmm4, zmm12, zmm4", "vpmaddubsw zmm5, zmm12, zmm5",
                     "vpmaddubsw zmm6, zmm12, zmm6", "vpmaddubsw zmm7, zmm12, zmm7", "vpmaddubsw zmm8, zmm12, zmm8",
                     "vpmaddubsw zmm9, zmm12, zmm9", "vpmaddubsw zmm10, zmm12, zmm10", "vpmaddubsw zmm11, zmm12, zmm11",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, options(nomem, nostack));
            });
            println!("vpmaddubsw zmm: {madd:.2} G/s ({:.2} per cycle)", madd / adds);
        }
        if LutKernel::Vnni.supported() {
            // the AVX-512 int8 encoder's step (`encode_i8::x86::nearest3_vnni`): one `vpdpbusd`
            // per prototype, pixel and kernel row, 16 channels × 3 taps of a 3×3 codebook (the
            // fourth byte is padding); 12 independent accumulators
            let dp = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13",
                     "2:",
                     "vpdpbusd zmm0, zmm12, zmm13", "vpdpbusd zmm1, zmm12, zmm13", "vpdpbusd zmm2, zmm12, zmm13",
                     "vpdpbusd zmm3, zmm12, zmm13", "vpdpbusd zmm4, zmm12, zmm13", "vpdpbusd zmm5, zmm12, zmm13",
                     "vpdpbusd zmm6, zmm12, zmm13", "vpdpbusd zmm7, zmm12, zmm13", "vpdpbusd zmm8, zmm12, zmm13",
                     "vpdpbusd zmm9, zmm12, zmm13", "vpdpbusd zmm10, zmm12, zmm13", "vpdpbusd zmm11, zmm12, zmm13",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, out("zmm13") _, options(nomem, nostack));
            });
            println!(
                "vpdpbusd zmm: {dp:.2} G/s ({:.2} per cycle): the AVX-512 int8 encoder's multiply limit, {:.1} GMAC/s over 3×3 codebooks",
                dp / adds,
                dp * 48.0
            );
            // the same with the kernel's argmin step per prototype and pixel after its 3 kernel
            // rows: the key `(sum << 4) | (15 − k)` (a shift and an or) and a maximum; 4 prototypes
            // of 3 `vpdpbusd` each per loop (12 multiply-type instructions, as above)
            let mix = time(&|| unsafe {
                asm!("vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13", "vpxord zmm14, zmm14, zmm14",
                     "2:",
                     "vpdpbusd zmm0, zmm12, zmm13", "vpdpbusd zmm1, zmm12, zmm13", "vpdpbusd zmm2, zmm12, zmm13",
                     "vpdpbusd zmm3, zmm12, zmm13",
                     "vpdpbusd zmm0, zmm12, zmm13", "vpdpbusd zmm1, zmm12, zmm13", "vpdpbusd zmm2, zmm12, zmm13",
                     "vpdpbusd zmm3, zmm12, zmm13",
                     "vpdpbusd zmm0, zmm12, zmm13", "vpdpbusd zmm1, zmm12, zmm13", "vpdpbusd zmm2, zmm12, zmm13",
                     "vpdpbusd zmm3, zmm12, zmm13",
                     "vpslld zmm4, zmm0, 4", "vpslld zmm5, zmm1, 4", "vpslld zmm6, zmm2, 4", "vpslld zmm7, zmm3, 4",
                     "vpord zmm4, zmm4, zmm14", "vpord zmm5, zmm5, zmm14", "vpord zmm6, zmm6, zmm14",
                     "vpord zmm7, zmm7, zmm14",
                     "vpmaxsd zmm8, zmm8, zmm4", "vpmaxsd zmm9, zmm9, zmm5", "vpmaxsd zmm10, zmm10, zmm6",
                     "vpmaxsd zmm11, zmm11, zmm7",
                     "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
                     "vpxord zmm3, zmm3, zmm3",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                     out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                     out("zmm12") _, out("zmm13") _, out("zmm14") _, options(nomem, nostack));
            });
            println!(
                "vpdpbusd zmm with the argmin steps: {mix:.2} G/s ({:.2} per cycle): {:.1} GMAC/s over 3×3 codebooks",
                mix / adds,
                mix * 48.0
            );
        }
        if Simd::Avx2.supported() {
            let shuf = time(&|| unsafe {
                asm!("vpxor ymm12, ymm12, ymm12",
                     "2:",
                     "vpshufb ymm0, ymm12, ymm0", "vpshufb ymm1, ymm12, ymm1", "vpshufb ymm2, ymm12, ymm2",
                     "vpshufb ymm3, ymm12, ymm3", "vpshufb ymm4, ymm12, ymm4", "vpshufb ymm5, ymm12, ymm5",
                     "vpshufb ymm6, ymm12, ymm6", "vpshufb ymm7, ymm12, ymm7", "vpshufb ymm8, ymm12, ymm8",
                     "vpshufb ymm9, ymm12, ymm9", "vpshufb ymm10, ymm12, ymm10", "vpshufb ymm11, ymm12, ymm11",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
                     out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                     out("ymm12") _, options(nomem, nostack));
            });
            println!("vpshufb ymm: {shuf:.2} G/s ({:.2} per cycle)", shuf / adds);
            // the AVX2 int8 encoder's step (`encode_i8`): `vpmaddubsw` then `vpmaddwd` per kernel
            // row, 8 channels × 3 taps of a 3×3 codebook (the fourth byte is padding); independent pairs,
            // as the kernel's
            let pair = time(&|| unsafe {
                asm!("vpxor ymm12, ymm12, ymm12", "vpxor ymm13, ymm13, ymm13",
                     "2:",
                     "vpmaddubsw ymm0, ymm13, ymm12", "vpmaddwd ymm0, ymm0, ymm12",
                     "vpmaddubsw ymm1, ymm13, ymm12", "vpmaddwd ymm1, ymm1, ymm12",
                     "vpmaddubsw ymm2, ymm13, ymm12", "vpmaddwd ymm2, ymm2, ymm12",
                     "vpmaddubsw ymm3, ymm13, ymm12", "vpmaddwd ymm3, ymm3, ymm12",
                     "vpmaddubsw ymm4, ymm13, ymm12", "vpmaddwd ymm4, ymm4, ymm12",
                     "vpmaddubsw ymm5, ymm13, ymm12", "vpmaddwd ymm5, ymm5, ymm12",
                     "vpmaddubsw ymm6, ymm13, ymm12", "vpmaddwd ymm6, ymm6, ymm12",
                     "vpmaddubsw ymm7, ymm13, ymm12", "vpmaddwd ymm7, ymm7, ymm12",
                     "vpmaddubsw ymm8, ymm13, ymm12", "vpmaddwd ymm8, ymm8, ymm12",
                     "vpmaddubsw ymm9, ymm13, ymm12", "vpmaddwd ymm9, ymm9, ymm12",
                     "vpmaddubsw ymm10, ymm13, ymm12", "vpmaddwd ymm10, ymm10, ymm12",
                     "vpmaddubsw ymm11, ymm13, ymm12", "vpmaddwd ymm11, ymm11, ymm12",
                     "dec {n}", "jnz 2b", n = inout(reg) N => _,
                     out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
                     out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                     out("ymm12") _, out("ymm13") _, options(nomem, nostack));
            });
            println!(
                "vpmaddubsw + vpmaddwd ymm: {pair:.2} G pairs/s ({:.2} per cycle): the AVX2 int8 encoder's limit, {:.1} GMAC/s over 3×3 codebooks",
                pair / adds,
                pair * 24.0
            );
        }
    }
}
