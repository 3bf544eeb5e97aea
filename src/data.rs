//! Reading and writing `.npy` inputs, outputs and labels (format versions 1–3, C or Fortran order,
//! little- or big-endian; float32/64, int64/32/8, uint8 and bool elements).
//!
//! A `.npy` header is checked before anything is allocated from it: its element count (checked
//! arithmetic) times the element size must be bytes the file actually holds and within the
//! per-tensor limit of [`crate::limits`].

use crate::error::{Error, Result};
use crate::ir::{DType, Tensor};
use ndarray::{ArrayD, IxDyn, Shape, ShapeBuilder};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// What an `.npy` header says: the element type (`descr`, e.g. `<f4`), the layout, the shape, and
/// where the data starts.
struct Header<'a> {
    descr: &'a str,
    fortran: bool,
    shape: Vec<usize>,
    start: usize,
}

/// An element type: kind (`f`, `i`, `u`, `b`), size in bytes, and byte order.
struct Elem {
    kind: char,
    size: usize,
    big_endian: bool,
}

fn elem(descr: &str) -> std::result::Result<Elem, String> {
    let unsupported = || format!("unsupported .npy element type '{descr}'");
    let (order, rest) = match descr.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
        _ => ('|', descr),
    };
    let kind = rest.chars().next().ok_or_else(unsupported)?;
    let size = rest.get(1..).and_then(|s| s.parse().ok()).ok_or_else(unsupported)?;
    let big_endian = order == '>' || (order == '=' && cfg!(target_endian = "big"));
    Ok(Elem { kind, size, big_endian })
}

/// Parse the header of `.npy` bytes (nothing is allocated from its numbers here).
fn header(b: &[u8]) -> std::result::Result<Header<'_>, String> {
    if !b.starts_with(MAGIC) || b.len() < 10 {
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
    let fortran = match value_of("'fortran_order'")? {
        v if v.starts_with("False") => false,
        v if v.starts_with("True") => true,
        _ => return Err("the .npy fortran_order is neither True nor False".into()),
    };
    let shape = value_of("'shape'")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("the .npy shape is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad .npy dimension '{s}'")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Header {
        descr,
        fortran,
        shape,
        start: end,
    })
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
    let h = header(bytes).map_err(bad)?;
    let size = elem(h.descr).map_err(bad)?.size;
    let n = crate::limits::check_shape(&h.shape, size, ".npy header").map_err(|e| bad(e.to_string()))?;
    let need = n * size; // ≤ the limit, so no overflow
    let have = bytes.len() - h.start;
    if have < need {
        return Err(bad(format!(
            "the header promises {:?} ({need} bytes of data), the file holds {have}",
            h.shape
        )));
    }
    Ok(())
}

/// The elements of `data`, `W` bytes each, as little-endian byte arrays.
fn words<const W: usize>(data: &[u8], big_endian: bool) -> impl Iterator<Item = [u8; W]> + '_ {
    data.chunks_exact(W).map(move |c| {
        let mut w = [0u8; W];
        w.copy_from_slice(c);
        if big_endian {
            w.reverse();
        }
        w
    })
}

/// The tensor in `.npy` bytes already checked by [`check_npy`] (float64 becomes float32), or why
/// not; the header's element type comes with it, for messages.
fn decode(bytes: &[u8]) -> std::result::Result<(Tensor, &str), String> {
    let h = header(bytes)?;
    let e = elem(h.descr)?;
    let n = h.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let data = &bytes[h.start..];
    if n.and_then(|n| n.checked_mul(e.size)) != Some(data.len()) {
        return Err(format!(
            "the header promises {:?} of '{}', the file holds {} bytes of data",
            h.shape,
            h.descr,
            data.len()
        ));
    }
    let s = IxDyn(&h.shape).set_f(h.fortran);
    let be = e.big_endian;
    let t = match (e.kind, e.size) {
        ('f', 4) => Tensor::F32(array(&s, words(data, be).map(f32::from_le_bytes).collect())?),
        ('f', 8) => Tensor::F32(array(
            &s,
            words(data, be).map(|w| f64::from_le_bytes(w) as f32).collect(),
        )?),
        ('i', 8) => Tensor::I64(array(&s, words(data, be).map(i64::from_le_bytes).collect())?),
        ('i', 4) => Tensor::I32(array(&s, words(data, be).map(i32::from_le_bytes).collect())?),
        ('u', 1) => Tensor::U8(array(&s, data.to_vec())?),
        ('i', 1) => Tensor::I8(array(&s, data.iter().map(|&b| b as i8).collect())?),
        ('b', 1) => Tensor::Bool(array(&s, booleans(data)?)?),
        _ => return Err(format!("unsupported .npy element type '{}'", h.descr)),
    };
    Ok((t, h.descr))
}

/// The array of `v` in the header's order, in standard (C) layout.
fn array<T: Clone>(shape: &Shape<IxDyn>, v: Vec<T>) -> std::result::Result<ArrayD<T>, String> {
    let a = ArrayD::from_shape_vec(shape.clone(), v).map_err(|e| e.to_string())?;
    Ok(crate::interp::kernels::shape_ops::standard(a))
}

fn booleans(data: &[u8]) -> std::result::Result<Vec<bool>, String> {
    data.iter()
        .map(|&b| match b {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("a boolean .npy element is {b}, not 0 or 1")),
        })
        .collect()
}

/// Read a float32 `.npy` (float64 is converted).
pub fn read_f32(path: &Path) -> Result<ArrayD<f32>> {
    f32_from_npy(&npy_bytes(path)?, path)
}

/// A float32 (or float64, converted) array from `.npy` bytes already checked by [`check_npy`].
pub fn f32_from_npy(bytes: &[u8], path: &Path) -> Result<ArrayD<f32>> {
    let bad = |m: String| Error::Input(format!("{}: not a float32 .npy array: {m}", path.display()));
    match decode(bytes).map_err(bad)? {
        (Tensor::F32(a), _) => Ok(a),
        (_, descr) => Err(bad(format!("its elements are '{descr}'"))),
    }
}

/// Read integer labels from `.npy` (int64, int32 or uint8).
pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    labels_from_npy(&npy_bytes(path)?, path)
}

/// Integer labels (int64, int32 or uint8) from `.npy` bytes already checked by [`check_npy`].
pub fn labels_from_npy(bytes: &[u8], path: &Path) -> Result<Vec<i64>> {
    let bad = |m: String| Error::Input(format!("{}: not an integer label .npy array: {m}", path.display()));
    match decode(bytes).map_err(bad)? {
        (Tensor::I64(a), _) => Ok(a.into_iter().collect()),
        (Tensor::I32(a), _) => Ok(a.iter().map(|&v| v as i64).collect()),
        (Tensor::U8(a), _) => Ok(a.iter().map(|&v| v as i64).collect()),
        (_, descr) => Err(bad(format!(
            "its elements are '{descr}' (int64, int32 or uint8 expected)"
        ))),
    }
}

/// Read a `.npy` of any supported element type (float64 becomes float32).
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let bytes = npy_bytes(path)?;
    decode(&bytes)
        .map(|(t, _)| t)
        .map_err(|m| Error::Input(format!("{}: {m}", path.display())))
}

/// The `.npy` element type of a tensor (little-endian).
fn descr(d: DType) -> &'static str {
    match d {
        DType::F32 => "<f4",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::Bool => "|b1",
    }
}

/// The `.npy` header of a C-order tensor: version 1.0 (2.0 when longer than 64 KiB), the header
/// dictionary padded with spaces and a newline so the data starts on a 64-byte boundary.
fn header_bytes(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {tuple}}}",
        descr(dtype)
    );
    // magic, version, header length (2 bytes in version 1, 4 in version 2), dict, newline
    let lengths = |prefix: usize| {
        let unpadded = prefix + dict.len() + 1;
        let total = unpadded + 64 - unpadded % 64;
        (total, total - prefix)
    };
    let v1 = lengths(10).1 <= usize::from(u16::MAX);
    let (total, len) = lengths(if v1 { 10 } else { 12 });
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend([1, 0]);
        out.extend((len as u16).to_le_bytes());
    } else {
        out.extend([2, 0]);
        out.extend((len as u32).to_le_bytes());
    }
    out.extend(dict.bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Write a tensor as `.npy` atomically (see [`crate::output`]).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let mut out = crate::output::Pending::create(path)?;
    let file = out.file();
    file.write_all(&header_bytes(t.dtype(), t.shape()))
        .and_then(|()| file.write_all(&t.to_le_bytes()))
        .map_err(|e| Error::Other(format!("{}: cannot write .npy: {e}", path.display())))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    fn round_trip(t: &Tensor) -> Tensor {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npy");
        write_npy(&p, t).unwrap();
        read_tensor(&p).unwrap()
    }

    #[test]
    fn header_is_numpy_format_1_padded_to_64_bytes() {
        let h = header_bytes(DType::F32, &[2, 3, 4]);
        let dict = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4)}";
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..10], b"\x93NUMPY\x01\x00\x76\x00");
        assert_eq!(&h[10..10 + dict.len()], dict);
        assert!(h[10 + dict.len()..127].iter().all(|&b| b == b' ') && h[127] == b'\n');
        let scalar = header_bytes(DType::U8, &[]);
        assert!(scalar.starts_with(b"\x93NUMPY\x01\x00\x76\x00{'descr': '|u1', 'fortran_order': False, 'shape': ()}"));
        assert!(header_bytes(DType::I64, &[7])
            .windows(13)
            .any(|w| w == b"'shape': (7,)"));
    }

    #[test]
    fn every_dtype_round_trips() {
        let f = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] * 12 + i[1] * 4 + i[2]) as f32 - 11.5);
        for t in [
            Tensor::F32(f.clone()),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.5)),
            Tensor::I64(f.mapv(|v| v as i64 * 1_000_000_007)),
            Tensor::I32(f.mapv(|v| v as i32)),
            Tensor::U8(f.mapv(|v| (v + 12.0) as u8)),
            Tensor::I8(f.mapv(|v| v as i8)),
            Tensor::Bool(f.mapv(|v| v > 0.0)),
        ] {
            assert_eq!(round_trip(&t), t);
        }
        // a transposed (Fortran-layout) array is written in its logical order
        assert_eq!(
            round_trip(&Tensor::F32(f.clone().reversed_axes())),
            Tensor::F32(f.reversed_axes())
        );
    }

    /// `.npy` bytes with the given header dictionary and data.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((dict.len() as u16).to_le_bytes());
        b.extend(dict.bytes());
        b.extend(data);
        b
    }

    #[test]
    fn fortran_order_big_endian_and_float64_are_read() {
        let p = Path::new("x.npy");
        let data: Vec<u8> = [1f64, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let b = npy("{'descr': '>f8', 'fortran_order': True, 'shape': (2, 3), }", &data);
        check_npy(&b, p).unwrap();
        let a = f32_from_npy(&b, p).unwrap();
        assert_eq!(a, ndarray::array![[1f32, 3., 5.], [2., 4., 6.]].into_dyn());
        let b = npy(
            "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }",
            &[7, 0, 0, 0, 8, 0, 0, 0, 9, 0, 0, 0],
        );
        assert_eq!(labels_from_npy(&b, p).unwrap(), [7, 8, 9]);
    }

    #[test]
    fn wrong_element_types_and_sizes_are_errors() {
        type Reader = fn(&[u8], &Path) -> Result<()>;
        let floats: Reader = |b, p| f32_from_npy(b, p).map(drop);
        let labels: Reader = |b, p| labels_from_npy(b, p).map(drop);
        let d = |descr: &str| format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2,), }}");
        let cases: [(String, &[u8], Reader, &str); 6] = [
            (d("<f4"), &[0; 8], labels, "'<f4' (int64, int32 or uint8 expected)"),
            (
                d("|u1"),
                &[1, 2],
                floats,
                "not a float32 .npy array: its elements are '|u1'",
            ),
            (d("|u1"), &[1, 2, 3], labels, "holds 3 bytes"),
            (d("<c8"), &[0; 16], floats, "unsupported .npy element type '<c8'"),
            (d("|b1"), &[0, 2], labels, "not 0 or 1"),
            (
                "{'descr': '<f4', 'shape': (2,), }".into(),
                &[0; 8],
                check_npy,
                "no 'fortran_order'",
            ),
        ];
        for (dict, data, read, needle) in cases {
            let e = read(&npy(&dict, data), Path::new("x.npy")).unwrap_err().to_string();
            assert!(
                e.starts_with("invalid input: x.npy: ") && e.contains(needle),
                "{dict}: {e}"
            );
        }
    }
}
