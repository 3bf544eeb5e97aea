//! Decoding `.onnx` files and converting `TensorProto`s (inline or external data) to tensors.

use crate::error::{Error, Result};
use crate::ir::Tensor;
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, TensorProto};

pub fn read_model_proto(path: &Path) -> Result<ModelProto> {
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

/// Reads tensors, resolving `data_location = EXTERNAL` relative to the model's directory
/// (each external file is read once).
pub struct TensorReader {
    base: PathBuf,
    files: HashMap<String, Vec<u8>>,
}

impl TensorReader {
    pub fn new(model_path: &Path) -> TensorReader {
        TensorReader {
            base: model_path.parent().map(Path::to_path_buf).unwrap_or_default(),
            files: HashMap::new(),
        }
    }

    pub fn read(&mut self, t: &TensorProto) -> Result<Tensor> {
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| Error::Other(format!("negative dimension {d}"))))
            .collect::<Result<_>>()?;
        let n: usize = shape.iter().product();
        let external = t.data_location == Some(1);
        let raw: Option<&[u8]> = if external {
            Some(self.external_bytes(t)?)
        } else if !t.raw_data.is_empty() {
            Some(&t.raw_data)
        } else {
            None
        };
        let dt = DataType::try_from(t.data_type).unwrap_or(DataType::Undefined);
        macro_rules! from_raw {
            ($ty:ty, $w:expr) => {{
                let raw = raw.unwrap();
                if raw.len() != n * $w {
                    return Err(Error::Other(format!(
                        "holds {} bytes of data, but {:?} {:?} needs {}",
                        raw.len(),
                        dt,
                        shape,
                        n * $w
                    )));
                }
                raw.chunks_exact($w)
                    .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<$ty>>()
            }};
        }
        fn check<T>(v: Vec<T>, n: usize, shape: &[usize]) -> Result<ArrayD<T>> {
            let len = v.len();
            ArrayD::from_shape_vec(IxDyn(shape), v)
                .map_err(|_| Error::Other(format!("holds {len} values, but shape {shape:?} needs {n}")))
        }
        Ok(match dt {
            DataType::Float => {
                let v = if raw.is_some() {
                    from_raw!(f32, 4)
                } else {
                    t.float_data.clone()
                };
                Tensor::F32(check(v, n, &shape)?)
            }
            DataType::Double => {
                let v = if raw.is_some() {
                    from_raw!(f64, 8)
                } else {
                    t.double_data.clone()
                };
                Tensor::F32(check(v.into_iter().map(|x| x as f32).collect(), n, &shape)?)
            }
            DataType::Int64 => {
                let v = if raw.is_some() {
                    from_raw!(i64, 8)
                } else {
                    t.int64_data.clone()
                };
                Tensor::I64(check(v, n, &shape)?)
            }
            DataType::Int32 | DataType::Int16 | DataType::Uint16 => {
                let v: Vec<i32> = match (raw.is_some(), dt) {
                    (true, DataType::Int32) => from_raw!(i32, 4),
                    (true, DataType::Int16) => from_raw!(i16, 2).into_iter().map(i32::from).collect(),
                    (true, _) => from_raw!(u16, 2).into_iter().map(i32::from).collect(),
                    (false, _) => t.int32_data.clone(),
                };
                Tensor::I32(check(v, n, &shape)?)
            }
            DataType::Uint8 | DataType::Int8 | DataType::Bool => {
                let v: Vec<u8> = match raw {
                    Some(r) => r.to_vec(),
                    None => t.int32_data.iter().map(|&x| x as u8).collect(),
                };
                match dt {
                    DataType::Uint8 => Tensor::U8(check(v, n, &shape)?),
                    DataType::Int8 => Tensor::I8(check(v.into_iter().map(|x| x as i8).collect(), n, &shape)?),
                    _ => Tensor::Bool(check(v.into_iter().map(|x| x != 0).collect(), n, &shape)?),
                }
            }
            other => {
                return Err(Error::Other(format!(
                    "tensor data type {} is not supported",
                    other.as_str_name()
                )))
            }
        })
    }

    fn external_bytes(&mut self, t: &TensorProto) -> Result<&[u8]> {
        let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
        let location = get("location").ok_or_else(|| Error::Other("external data has no location".into()))?;
        let offset: usize = get("offset").map(|v| v.parse().unwrap_or(usize::MAX)).unwrap_or(0);
        let file = self.base.join(&location);
        if !self.files.contains_key(&location) {
            let bytes = std::fs::read(&file)
                .map_err(|e| Error::Other(format!("external data file {} cannot be read: {e}", file.display())))?;
            self.files.insert(location.clone(), bytes);
        }
        let data = &self.files[&location];
        let length: usize = match get("length") {
            Some(v) => v.parse().unwrap_or(usize::MAX),
            None => data.len().saturating_sub(offset),
        };
        data.get(offset..offset.saturating_add(length)).ok_or_else(|| {
            Error::Other(format!(
                "external data {}[{offset}..+{length}] is past the end of the file ({} bytes)",
                file.display(),
                data.len()
            ))
        })
    }
}
