//! The allocation budget: every size read from a file or a flag is computed with checked
//! arithmetic and checked against the bytes actually present or against this limit before
//! anything is allocated (see "Overflow policy" in docs/ARCHITECTURE.md).
//!
//! One tensor — a model constant, an input batch, a decompressed dataset, an inferred or computed
//! value — may hold at most [`max_tensor_bytes`]: 4 GiB by default, or the byte count in the
//! environment variable `TABCONV_MAX_TENSOR_BYTES`.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// The default per-tensor limit: 4 GiB (2^30 float32 values).
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 1 << 32;

/// The environment variable that overrides [`DEFAULT_MAX_TENSOR_BYTES`].
pub const MAX_TENSOR_BYTES_ENV: &str = "TABCONV_MAX_TENSOR_BYTES";

/// The largest tensor tabconv allocates, in bytes.
pub fn max_tensor_bytes() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var(MAX_TENSOR_BYTES_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_MAX_TENSOR_BYTES)
    })
}

/// The largest data file (`.npy`, IDX, CIFAR; gzipped ones after decompression) read: the
/// per-tensor limit plus 1 MiB for headers.
pub fn max_file_bytes() -> u64 {
    max_tensor_bytes().saturating_add(1 << 20)
}

/// The element count of `shape` (checked), when `elem_bytes`-byte elements of it fit the
/// per-tensor limit; otherwise an error naming `what`.
pub fn check_shape(shape: &[usize], elem_bytes: usize, what: &str) -> Result<usize> {
    let too_big = || {
        Error::Other(format!(
            "{what}: shape {shape:?} of {elem_bytes}-byte values exceeds the {} byte limit per tensor \
             (set {MAX_TENSOR_BYTES_ENV} to change it)",
            max_tensor_bytes()
        ))
    };
    let limit = max_tensor_bytes() / elem_bytes.max(1) as u64;
    let mut n: u64 = 1;
    for &d in shape {
        // A dimension beyond the limit is refused even when another one is 0 (nothing sane
        // iterates over it).
        if d as u64 > limit {
            return Err(too_big());
        }
        n = n.checked_mul(d as u64).ok_or_else(too_big)?;
    }
    if n > limit {
        return Err(too_big());
    }
    Ok(n as usize)
}

/// [`check_shape`] for a tensor of `n` elements.
pub fn check_len(n: usize, elem_bytes: usize, what: &str) -> Result<usize> {
    check_shape(&[n], elem_bytes, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_over_the_limit_or_overflowing_are_refused() {
        assert_eq!(check_shape(&[2, 3, 4], 4, "x").unwrap(), 24);
        assert_eq!(check_shape(&[], 4, "x").unwrap(), 1);
        assert_eq!(check_shape(&[0, 5], 4, "x").unwrap(), 0);
        let e = check_shape(&[1 << 40], 4, "npy").unwrap_err().to_string();
        assert!(e.contains("npy") && e.contains("byte limit"), "{e}");
        assert!(check_shape(&[usize::MAX, usize::MAX], 1, "x").is_err());
        assert!(
            check_shape(&[0, usize::MAX], 1, "x").is_err(),
            "a huge dimension of an empty tensor"
        );
        let limit = max_tensor_bytes() as usize;
        assert!(check_len(limit / 4, 4, "x").is_ok());
        assert!(check_len(limit / 4 + 1, 4, "x").is_err());
    }
}
