//! Reading and writing `.npy` inputs, outputs and labels.

use crate::error::{Error, Result};
use crate::ir::Tensor;
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::path::Path;

/// Read a float32 `.npy` (float64 is converted).
pub fn read_f32(path: &Path) -> Result<ArrayD<f32>> {
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    if let Ok(a) = ArrayD::<f32>::read_npy(open()?) {
        return Ok(a);
    }
    match ArrayD::<f64>::read_npy(open()?) {
        Ok(a) => Ok(a.mapv(|v| v as f32)),
        Err(e) => Err(Error::Input(format!(
            "{}: not a float32 .npy array: {e}",
            path.display()
        ))),
    }
}

/// Read integer labels from `.npy` (int64, int32 or uint8).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    if let Ok(a) = ArrayD::<i64>::read_npy(open()?) {
        return Ok(a.iter().copied().collect());
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(open()?) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    match ArrayD::<u8>::read_npy(open()?) {
        Ok(a) => Ok(a.iter().map(|&v| v as i64).collect()),
        Err(e) => Err(Error::Input(format!(
            "{}: not an integer label .npy array: {e}",
            path.display()
        ))),
    }
}

/// Write a tensor as `.npy` atomically (temp file in the same directory, then rename).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    let res = match t {
        Tensor::F32(a) => a.write_npy(tmp.as_file()),
        Tensor::I64(a) => a.write_npy(tmp.as_file()),
        Tensor::I32(a) => a.write_npy(tmp.as_file()),
        Tensor::U8(a) => a.write_npy(tmp.as_file()),
        Tensor::I8(a) => a.write_npy(tmp.as_file()),
        Tensor::Bool(a) => a.write_npy(tmp.as_file()),
    };
    res.map_err(|e| Error::Other(format!("{}: cannot write .npy: {e}", path.display())))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Read a `.npy` of any supported element type.
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    if let Ok(a) = ArrayD::<f32>::read_npy(open()?) {
        return Ok(Tensor::F32(a));
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(open()?) {
        return Ok(Tensor::I64(a));
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(open()?) {
        return Ok(Tensor::I32(a));
    }
    if let Ok(a) = ArrayD::<u8>::read_npy(open()?) {
        return Ok(Tensor::U8(a));
    }
    read_f32(path).map(Tensor::F32)
}
