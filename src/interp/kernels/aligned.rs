//! A float buffer aligned to 64 bytes (one cache line, one AVX-512 vector).
//!
//! Kernels that stream a table with full-vector loads (the channel-lane encoder's prototypes,
//! the direct convolution's packed weights) lose about a quarter of their speed when every
//! load straddles two cache lines, which a `Vec<f32>` (16-byte aligned by the allocator) makes
//! likely. Measured: the two-row encoder call, 9 taps, 65 ns aligned vs 88 ns at a 16-byte
//! offset (`encode::tests::nearest2_throughput`, `SKEW=4`).

use std::ops::{Deref, DerefMut};

#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` floats starting on a 64-byte boundary; derefs to `[f32]`.
#[derive(Clone, Default)]
pub struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    /// `len` zeros.
    pub fn zeros(len: usize) -> AlignedF32 {
        AlignedF32 {
            lines: vec![Line::default(); len.div_ceil(16)],
            len,
        }
    }
}

impl From<&[f32]> for AlignedF32 {
    fn from(v: &[f32]) -> AlignedF32 {
        let mut a = AlignedF32::zeros(v.len());
        a.copy_from_slice(v);
        a
    }
}

impl Deref for AlignedF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds `16 · lines.len() ≥ len` initialised floats, contiguous
        // (`Line` is `repr(C)` over `[f32; 16]`, 64 bytes, no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl DerefMut for AlignedF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

impl std::fmt::Debug for AlignedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedF32;

    #[test]
    fn aligned_buffers_start_on_a_cache_line_and_keep_their_values() {
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let v: Vec<f32> = (0..len).map(|i| i as f32 * 0.5).collect();
            let a = AlignedF32::from(v.as_slice());
            assert_eq!(&a[..], &v[..]);
            assert_eq!(a.as_ptr() as usize % 64, 0, "len {len}");
            let mut z = AlignedF32::zeros(len);
            assert!(z.iter().all(|&x| x == 0.0) && z.len() == len);
            z.iter_mut().for_each(|x| *x = 1.0);
            assert_eq!(z.iter().sum::<f32>(), len as f32);
        }
    }
}
