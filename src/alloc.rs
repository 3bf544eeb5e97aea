//! The binaries' global allocator: the system allocator, with every block of 4 KiB or more
//! aligned to 64 bytes (a cache line, an AVX-512 vector).
//!
//! Activations are plain `Vec<f32>`s, which the system allocator aligns to 16 bytes; a kernel
//! that loads a 16-channel vector per pixel then straddles two cache lines on every load (the
//! channel-lane encoder measured about a quarter slower on misaligned data). Small blocks keep
//! their natural alignment.

use std::alloc::{GlobalAlloc, Layout, System};

/// See the module documentation; installed with `#[global_allocator]` by `tabconv` and
/// `tabconv-compile`.
pub struct CacheAligned;

const LINE: usize = 64;
const MIN_SIZE: usize = 4096;

/// The layout a block is really allocated with.
fn real(l: Layout) -> Layout {
    if l.size() >= MIN_SIZE && l.align() < LINE {
        // A valid layout stays valid with a larger power-of-two alignment below the size.
        Layout::from_size_align(l.size(), LINE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every block is allocated and freed through `System` with the same layout (`real`
// applied to the caller's layout, which the caller passes unchanged to `dealloc`); `realloc`
// moves a block whose real alignment changes by allocate-copy-free.
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded; `real(l)` has `l`'s nonzero size.
        unsafe { System.alloc(real(l)) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(real(l)) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated with `real(l)`.
        unsafe { System.dealloc(p, real(l)) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let old = real(l);
        // SAFETY: the caller guarantees `new_size`, rounded up to `l.align()`, fits an isize.
        let new = real(unsafe { Layout::from_size_align_unchecked(new_size, l.align()) });
        if old.align() == new.align() {
            // SAFETY: `p` was allocated with `old`.
            return unsafe { System.realloc(p, old, new_size) };
        }
        // SAFETY: `new` is a valid nonzero layout; both blocks hold `min` bytes; `p` was
        // allocated with `old` and is not used after being freed.
        unsafe {
            let q = System.alloc(new);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                System.dealloc(p, old);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_line_aligned_through_growth_and_shrinking() {
        let a = CacheAligned;
        for (from, to) in [(16usize, 8192usize), (8192, 16), (5000, 70000), (100, 200)] {
            let l = Layout::from_size_align(from, 4).unwrap();
            // SAFETY: nonzero layouts; every block is freed with the layout it has.
            unsafe {
                let p = a.alloc(l);
                assert!(!p.is_null());
                if from >= MIN_SIZE {
                    assert_eq!(p as usize % LINE, 0);
                }
                for i in 0..from {
                    *p.add(i) = (i % 251) as u8;
                }
                let q = a.realloc(p, l, to);
                assert!(!q.is_null());
                if to >= MIN_SIZE {
                    assert_eq!(q as usize % LINE, 0, "{from} -> {to}");
                }
                for i in 0..from.min(to) {
                    assert_eq!(*q.add(i), (i % 251) as u8, "{from} -> {to} byte {i}");
                }
                a.dealloc(q, Layout::from_size_align(to, 4).unwrap());
            }
        }
    }
}
