//! Decoding `.onnx` files and converting `TensorProto`s (inline or external data) to tensors.

use crate::error::{Error, Result};
use crate::ir::Tensor;
use crate::onnx::pb::tensor_proto::{DataLocation, DataType};
use crate::onnx::pb::{ModelProto, TensorProto};
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Protobuf messages are limited to 2 GiB, so no larger file can be a model (weights beyond that
/// live in external data).
pub const MAX_MODEL_FILE_BYTES: u64 = 2 << 30;

pub fn read_model_proto(path: &Path) -> Result<ModelProto> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Model {
            path: path.into(),
            msg: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_MODEL_FILE_BYTES {
        return Err(Error::Model {
            path: path.into(),
            msg: format!(
                "{} bytes is more than a protobuf model can hold ({MAX_MODEL_FILE_BYTES})",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::Model {
            path: path.into(),
            msg: "file is empty".into(),
        });
    }
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Model {
        path: path.into(),
        msg: format!("not a valid ONNX protobuf (truncated or corrupt?): {e}"),
    })?;
    match &model.graph {
        Some(g) if !g.node.is_empty() || !g.output.is_empty() => Ok(model),
        _ => Err(Error::Model {
            path: path.into(),
            msg: "decoded, but holds no graph: not an ONNX model".into(),
        }),
    }
}

/// Reads tensors, resolving `data_location = EXTERNAL` relative to the model's folder.
///
/// External data is untrusted input: a `location` must be a relative path that, with every
/// symlink followed, stays inside the model's folder and names a regular file; only the tensor's
/// `offset..offset+length` bytes are read, and only after checking that they are exactly the
/// bytes its dtype and shape need and that the file holds them. A `.tcv` never has external data
/// ([`TensorReader::without_external`]).
pub struct TensorReader {
    base: PathBuf,
    allow_external: bool,
    /// `location` → (canonical path, file length), checked once per file.
    files: HashMap<String, (PathBuf, u64)>,
}

fn other(msg: String) -> Error {
    Error::Other(msg)
}

/// Bytes per element of the data types tabconv reads.
fn dtype_width(dt: DataType) -> Result<usize> {
    Ok(match dt {
        DataType::Float | DataType::Int32 => 4,
        DataType::Double | DataType::Int64 => 8,
        DataType::Int16 | DataType::Uint16 => 2,
        DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
        other => {
            return Err(Error::Other(format!(
                "tensor data type {} is not supported",
                other.as_str_name()
            )))
        }
    })
}

impl TensorReader {
    pub fn new(model_path: &Path) -> TensorReader {
        TensorReader {
            base: model_path.parent().map(Path::to_path_buf).unwrap_or_default(),
            allow_external: true,
            files: HashMap::new(),
        }
    }

    /// A reader that refuses external data (for `.tcv` files, see docs/TCV-FORMAT.md).
    pub fn without_external(model_path: &Path) -> TensorReader {
        TensorReader {
            allow_external: false,
            ..TensorReader::new(model_path)
        }
    }

    pub fn read(&mut self, t: &TensorProto) -> Result<Tensor> {
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| other(format!("negative dimension {d}"))))
            .collect::<Result<_>>()?;
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| other(format!("shape {shape:?} has more elements than memory can address")))?;
        let dt = DataType::try_from(t.data_type).unwrap_or(DataType::Undefined);
        let width = dtype_width(dt)?;
        let bytes = n
            .checked_mul(width)
            .ok_or_else(|| other(format!("shape {shape:?} of {dt:?} overflows a byte count")))?;
        let raw: Option<std::borrow::Cow<'_, [u8]>> = if t.data_location == Some(DataLocation::External as i32) {
            Some(self.external_bytes(t, bytes)?.into())
        } else if !t.raw_data.is_empty() {
            Some(t.raw_data.as_slice().into())
        } else {
            None
        };
        if let Some(r) = &raw {
            if r.len() != bytes {
                return Err(other(format!(
                    "holds {} bytes of data, but {dt:?} {shape:?} needs {bytes}",
                    r.len()
                )));
            }
        }
        convert(dt, &shape, raw.as_deref(), t)
    }

    /// The checked `location` of an external tensor: its canonical path and the file's length.
    fn external_file(&mut self, location: &str) -> Result<(PathBuf, u64)> {
        if let Some(f) = self.files.get(location) {
            return Ok(f.clone());
        }
        let base = if self.base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &self.base
        };
        let refuse = |why: &str| {
            other(format!(
                "external data location '{location}' {why}; only files inside the model's folder {} are read",
                base.display()
            ))
        };
        let rel = Path::new(location);
        if location.is_empty() {
            return Err(refuse("is empty"));
        }
        if rel.is_absolute() || rel.has_root() || location.starts_with(['/', '\\']) {
            return Err(refuse("is an absolute path"));
        }
        let canon_base = base.canonicalize().map_err(|e| Error::io(base, e))?;
        let file = base.join(rel);
        let canon = file
            .canonicalize()
            .map_err(|e| other(format!("external data file {} cannot be read: {e}", file.display())))?;
        if !canon.starts_with(&canon_base) {
            return Err(refuse(&format!(
                "resolves to {}, outside the model's folder",
                canon.display()
            )));
        }
        let meta = std::fs::metadata(&canon).map_err(|e| Error::io(&canon, e))?;
        if !meta.is_file() {
            return Err(refuse("is not a regular file"));
        }
        let entry = (canon, meta.len());
        self.files.insert(location.to_string(), entry.clone());
        Ok(entry)
    }

    /// Exactly `expected` bytes of an external tensor, read from `offset` after every check.
    fn external_bytes(&mut self, t: &TensorProto, expected: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        if !self.allow_external {
            return Err(other(
                "has external data, which a .tcv file never has (docs/TCV-FORMAT.md: initializers are raw data)".into(),
            ));
        }
        let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
        let location = get("location").ok_or_else(|| other("external data has no location".into()))?;
        let number = |k: &str| -> Result<Option<u64>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| other(format!("external data {k} '{v}' is not a non-negative integer")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?.unwrap_or(expected as u64);
        if length != expected as u64 {
            return Err(other(format!(
                "external data in '{location}' has length {length}, but the tensor's dtype and shape need {expected} bytes"
            )));
        }
        let (path, file_len) = self.external_file(location)?;
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(other(format!(
                "external data {}[{offset}..+{length}] is past the end of the file ({file_len} bytes)",
                path.display()
            )));
        }
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0u8; expected];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| Error::io(&path, e))?;
        Ok(buf)
    }
}

/// Build the tensor from raw little-endian bytes (already checked to be `n × width` long) or the
/// typed fields.
fn convert(dt: DataType, shape: &[usize], raw: Option<&[u8]>, t: &TensorProto) -> Result<Tensor> {
    macro_rules! from_raw {
        ($r:expr, $ty:ty, $w:expr) => {
            $r.chunks_exact($w)
                .map(|c| {
                    let mut b = [0u8; $w];
                    b.copy_from_slice(c);
                    <$ty>::from_le_bytes(b)
                })
                .collect::<Vec<$ty>>()
        };
    }
    fn check<T>(v: Vec<T>, shape: &[usize]) -> Result<ArrayD<T>> {
        let len = v.len();
        ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|_| {
            Error::Other(format!(
                "holds {len} values, but shape {shape:?} needs {}",
                shape.iter().product::<usize>()
            ))
        })
    }
    Ok(match (dt, raw) {
        (DataType::Float, Some(r)) => Tensor::F32(check(from_raw!(r, f32, 4), shape)?),
        (DataType::Float, None) => Tensor::F32(check(t.float_data.clone(), shape)?),
        (DataType::Double, _) => {
            let v = match raw {
                Some(r) => from_raw!(r, f64, 8),
                None => t.double_data.clone(),
            };
            Tensor::F32(check(v.into_iter().map(|x| x as f32).collect(), shape)?)
        }
        (DataType::Int64, Some(r)) => Tensor::I64(check(from_raw!(r, i64, 8), shape)?),
        (DataType::Int64, None) => Tensor::I64(check(t.int64_data.clone(), shape)?),
        (DataType::Int32 | DataType::Int16 | DataType::Uint16, _) => {
            let v: Vec<i32> = match (raw, dt) {
                (Some(r), DataType::Int32) => from_raw!(r, i32, 4),
                (Some(r), DataType::Int16) => from_raw!(r, i16, 2).into_iter().map(i32::from).collect(),
                (Some(r), _) => from_raw!(r, u16, 2).into_iter().map(i32::from).collect(),
                (None, _) => t.int32_data.clone(),
            };
            Tensor::I32(check(v, shape)?)
        }
        (DataType::Uint8 | DataType::Int8 | DataType::Bool, _) => {
            let v: Vec<u8> = match raw {
                Some(r) => r.to_vec(),
                None => t.int32_data.iter().map(|&x| x as u8).collect(),
            };
            match dt {
                DataType::Uint8 => Tensor::U8(check(v, shape)?),
                DataType::Int8 => Tensor::I8(check(v.into_iter().map(|x| x as i8).collect(), shape)?),
                _ => Tensor::Bool(check(v.into_iter().map(|x| x != 0).collect(), shape)?),
            }
        }
        (other, _) => {
            return Err(Error::Other(format!(
                "tensor data type {} is not supported",
                other.as_str_name()
            )))
        }
    })
}
