//! Reading and writing `.npy` inputs, outputs and labels.
//!
//! A `.npy` header is checked before anything is allocated from it: its element count (checked
//! arithmetic) times the element size must be bytes the file actually holds and within the
//! per-tensor limit of [`crate::limits`].

use crate::error::{Error, Result};
use crate::ir::Tensor;
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::path::Path;

/// The `descr` element size and the `shape` of an `.npy` header, and where the data starts.
fn npy_header(b: &[u8]) -> std::result::Result<(usize, Vec<usize>, usize), String> {
    if !b.starts_with(b"\x93NUMPY") || b.len() < 10 {
        return Err("not an .npy file (bad magic)".into());
    }
    let (len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10usize),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= b.len())
        .ok_or("truncated .npy header")?;
    let text = std::str::from_utf8(&b[start..end]).map_err(|_| "the .npy header is not text")?;
    let value_of = |key: &str| -> std::result::Result<&str, String> {
        let at = text.find(key).ok_or_else(|| format!("the .npy header has no {key}"))?;
        Ok(text[at + key.len()..].trim_start().trim_start_matches(':').trim_start())
    };
    let descr = value_of("'descr'")?;
    let descr = descr.get(1..).and_then(|d| d.split(['\'', '"']).next()).unwrap_or("");
    let size: usize = descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| format!("unsupported .npy element type '{descr}'"))?;
    let shape = value_of("'shape'")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("the .npy shape is not a tuple")?;
    let dims = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad .npy dimension '{s}'")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((size, dims, end))
}

/// The bytes of an `.npy` file whose header promises no more than the file holds and than the
/// per-tensor limit.
pub fn npy_bytes(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > crate::limits::max_file_bytes() {
        return Err(Error::Input(format!(
            "{}: {len} bytes is more than the {} byte limit per tensor (set {} to change it)",
            path.display(),
            crate::limits::max_tensor_bytes(),
            crate::limits::MAX_TENSOR_BYTES_ENV
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_npy(&bytes, path)?;
    Ok(bytes)
}

/// Check an in-memory `.npy` (see [`npy_bytes`]).
pub fn check_npy(bytes: &[u8], path: &Path) -> Result<()> {
    let bad = |m: String| Error::Input(format!("{}: {m}", path.display()));
    let (size, shape, start) = npy_header(bytes).map_err(bad)?;
    let n = crate::limits::check_shape(&shape, size, ".npy header").map_err(|e| bad(e.to_string()))?;
    let need = n * size; // ≤ the limit, so no overflow
    let have = bytes.len() - start;
    if have < need {
        return Err(bad(format!(
            "the header promises {shape:?} ({need} bytes of data), the file holds {have}"
        )));
    }
    Ok(())
}

/// Read a float32 `.npy` (float64 is converted).
pub fn read_f32(path: &Path) -> Result<ArrayD<f32>> {
    f32_from_npy(&npy_bytes(path)?, path)
}

/// A float32 (or float64, converted) array from `.npy` bytes already checked by [`check_npy`].
pub fn f32_from_npy(bytes: &[u8], path: &Path) -> Result<ArrayD<f32>> {
    if let Ok(a) = ArrayD::<f32>::read_npy(bytes) {
        return Ok(a);
    }
    match ArrayD::<f64>::read_npy(bytes) {
        Ok(a) => Ok(a.mapv(|v| v as f32)),
        Err(e) => Err(Error::Input(format!(
            "{}: not a float32 .npy array: {e}",
            path.display()
        ))),
    }
}

/// Read integer labels from `.npy` (int64, int32 or uint8).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    labels_from_npy(&npy_bytes(path)?, path)
}

/// Integer labels from `.npy` bytes already checked by [`check_npy`].
pub fn labels_from_npy(bytes: &[u8], path: &Path) -> Result<Vec<i64>> {
    if let Ok(a) = ArrayD::<i64>::read_npy(bytes) {
        return Ok(a.iter().copied().collect());
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(bytes) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    match ArrayD::<u8>::read_npy(bytes) {
        Ok(a) => Ok(a.iter().map(|&v| v as i64).collect()),
        Err(e) => Err(Error::Input(format!(
            "{}: not an integer label .npy array: {e}",
            path.display()
        ))),
    }
}

/// Write a tensor as `.npy` atomically (see [`crate::output`]).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let mut out = crate::output::Pending::create(path)?;
    let file = out.file();
    let res = match t {
        Tensor::F32(a) => a.write_npy(file),
        Tensor::I64(a) => a.write_npy(file),
        Tensor::I32(a) => a.write_npy(file),
        Tensor::U8(a) => a.write_npy(file),
        Tensor::I8(a) => a.write_npy(file),
        Tensor::Bool(a) => a.write_npy(file),
    };
    res.map_err(|e| Error::Other(format!("{}: cannot write .npy: {e}", path.display())))?;
    out.commit()
}

/// Read a `.npy` of any supported element type.
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let bytes = npy_bytes(path)?;
    let b = bytes.as_slice();
    if let Ok(a) = ArrayD::<f32>::read_npy(b) {
        return Ok(Tensor::F32(a));
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(b) {
        return Ok(Tensor::I64(a));
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(b) {
        return Ok(Tensor::I32(a));
    }
    if let Ok(a) = ArrayD::<u8>::read_npy(b) {
        return Ok(Tensor::U8(a));
    }
    f32_from_npy(b, path).map(Tensor::F32)
}
