//! Image datasets for `eval`, calibration and validation: `.npy` (float32 NCHW), MNIST-style
//! IDX files (optionally gzipped, as Fashion-MNIST ships), and the CIFAR-10/100 binary format;
//! with optional `--pad N` and `--normalize MEAN,STD` preprocessing, in torchvision's order
//! (`Pad` on pixels, then `ToTensor`, then `Normalize`).

use crate::error::{Error, Result};
use ndarray::{s, Array4, ArrayD, IxDyn};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The `--normalize` / `--pad` command-line options shared by the binaries.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PreArgs {
    /// Normalise images as (x − MEAN) / STD, e.g. 0.1307,0.3081. Applied last: after IDX/CIFAR
    /// bytes are scaled to [0, 1] and after --pad (torchvision's Pad → ToTensor → Normalize).
    /// A .npy must then hold pixels in [0, 1]; an already-normalized one is refused
    #[arg(long, value_name = "MEAN,STD")]
    pub normalize: Option<String>,
    /// Pad images by N pixels on each side (e.g. 2 turns 28×28 into 32×32), in pixel space:
    /// before --normalize, with --pad-value
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub pad: usize,
    /// The padding's pixel value, before normalization (0: black, as torchvision's Pad). To pad
    /// with 0 after normalizing instead, give the mean here
    #[arg(long, value_name = "V", default_value_t = 0.0)]
    pub pad_value: f32,
}

impl PreArgs {
    pub fn get(&self) -> Result<Preprocess> {
        if !self.pad_value.is_finite() {
            return Err(Error::Input(format!(
                "--pad-value {}: not a finite number",
                self.pad_value
            )));
        }
        Ok(Preprocess {
            normalize: self.normalize.as_deref().map(Preprocess::parse_normalize).transpose()?,
            pad: self.pad,
            pad_value: self.pad_value,
        })
    }
}

/// Preprocessing applied after decoding (pixels of IDX/CIFAR files are first scaled to [0, 1]):
/// padding, then normalization.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Preprocess {
    /// `(x − mean) / std`
    pub normalize: Option<(f32, f32)>,
    /// Pad H and W by this many pixels on each side, with `pad_value` (before normalization).
    pub pad: usize,
    pub pad_value: f32,
}

impl Preprocess {
    /// Parse `MEAN,STD`.
    pub fn parse_normalize(s: &str) -> Result<(f32, f32)> {
        let bad = || Error::Input(format!("--normalize {s}: expected MEAN,STD (e.g. 0.1307,0.3081)"));
        let (m, d) = s.split_once(',').ok_or_else(bad)?;
        let (m, d): (f32, f32) = (
            m.trim().parse().map_err(|_| bad())?,
            d.trim().parse().map_err(|_| bad())?,
        );
        if d.is_nan() || d <= 0.0 {
            return Err(bad());
        }
        Ok((m, d))
    }
}

/// The file's bytes, decompressed when it is gzipped. Both the file and its decompressed data
/// are capped at [`crate::limits::max_file_bytes`] (a gzip bomb stops there).
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let cap = crate::limits::max_file_bytes();
    let too_big = |what: &str| {
        Error::Input(format!(
            "{}: {what} more than {cap} bytes, the limit for one data file (the per-tensor limit plus 1 MiB; \
             set {} to change it)",
            path.display(),
            crate::limits::MAX_TENSOR_BYTES_ENV
        ))
    };
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > cap {
        return Err(too_big("holds"));
    }
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::Input(format!("{}: corrupt gzip data: {e}", path.display())))?;
        if out.len() as u64 > cap {
            return Err(too_big("decompresses to"));
        }
        return Ok(out);
    }
    Ok(raw)
}

enum Kind {
    Npy,
    Idx,
    Cifar { label_bytes: usize },
}

fn kind(path: &Path, bytes: &[u8]) -> Result<Kind> {
    if bytes.starts_with(b"\x93NUMPY") {
        return Ok(Kind::Npy);
    }
    if bytes.len() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08 {
        return Ok(Kind::Idx);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".bin") {
        let (ten, hundred) = (bytes.len().is_multiple_of(3073), bytes.len().is_multiple_of(3074));
        // CIFAR-100 files are named train.bin / test.bin, CIFAR-10 ones data_batch_N.bin / test_batch.bin
        let hint100 = name == "train.bin" || name == "test.bin";
        return match (ten, hundred) {
            (true, false) => Ok(Kind::Cifar { label_bytes: 1 }),
            (false, true) => Ok(Kind::Cifar { label_bytes: 2 }),
            (true, true) => Ok(Kind::Cifar {
                label_bytes: if hint100 { 2 } else { 1 },
            }),
            _ => Err(Error::Input(format!(
                "{}: {} bytes is not a whole number of CIFAR-10 (3073-byte) or CIFAR-100 (3074-byte) records",
                path.display(),
                bytes.len()
            ))),
        };
    }
    Err(Error::Input(format!(
        "{}: unknown dataset format (expected .npy, an IDX file such as train-images-idx3-ubyte[.gz], or a CIFAR .bin)",
        path.display()
    )))
}

/// Parse an IDX header: returns (element type code, dims, payload offset).
fn idx_header(path: &Path, b: &[u8]) -> Result<(u8, Vec<usize>, usize)> {
    let ndim = b[3] as usize;
    let off = 4 + 4 * ndim;
    if b.len() < off {
        return Err(Error::Input(format!("{}: truncated IDX header", path.display())));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize)
        .collect();
    // checked against the limit for the float32 values the bytes become
    let n = crate::limits::check_shape(&dims, 4, "IDX header")
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    if b[2] != 0x08 {
        return Err(Error::Input(format!(
            "{}: only unsigned-byte IDX files are supported",
            path.display()
        )));
    }
    if b.len() - off != n {
        return Err(Error::Input(format!(
            "{}: IDX header promises {n} values, file holds {}",
            path.display(),
            b.len() - off
        )));
    }
    Ok((b[2], dims, off))
}

/// Load images as float32 NCHW.
pub fn load_images(path: &Path, pre: Preprocess) -> Result<ArrayD<f32>> {
    let bytes = read_bytes(path)?;
    let x: ArrayD<f32> = match kind(path, &bytes)? {
        Kind::Npy => {
            crate::data::check_npy(&bytes, path)?;
            crate::data::f32_from_npy(&bytes, path)?
        }
        Kind::Idx => {
            let (_, dims, off) = idx_header(path, &bytes)?;
            let shape = match dims.as_slice() {
                [n, h, w] => [*n, 1, *h, *w],
                [n, c, h, w] => [*n, *c, *h, *w],
                d => {
                    return Err(Error::Input(format!(
                        "{}: IDX images must be 3-D or 4-D, got {d:?}",
                        path.display()
                    )))
                }
            };
            let v = bytes[off..].iter().map(|&b| b as f32 / 255.0).collect();
            ArrayD::from_shape_vec(IxDyn(&shape), v)
                .map_err(|e| Error::Input(format!("{}: IDX images {shape:?}: {e}", path.display())))?
        }
        Kind::Cifar { label_bytes } => {
            let rec = label_bytes + 3072;
            let n = bytes.len() / rec;
            crate::limits::check_shape(&[n, 3, 32, 32], 4, "CIFAR images")
                .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            let mut v = Vec::with_capacity(n * 3072);
            for r in bytes.chunks_exact(rec) {
                v.extend(r[label_bytes..].iter().map(|&b| b as f32 / 255.0));
            }
            ArrayD::from_shape_vec(IxDyn(&[n, 3, 32, 32]), v)
                .map_err(|e| Error::Input(format!("{}: CIFAR images: {e}", path.display())))?
        }
    };
    preprocess(x, pre, path)
}

/// Pixels in [0, 1] (what `--normalize` expects), with a little slack for rounding.
fn check_pixels(x: &ArrayD<f32>, path: &Path) -> Result<()> {
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    if lo < -1e-3 || hi > 1.0 + 1e-3 || lo.is_nan() || hi.is_nan() {
        return Err(Error::Input(format!(
            "{}: --normalize expects pixels in [0, 1], but the values range over [{lo}, {hi}] \
             (already normalized? then drop --normalize; 0..255 pixels? divide by 255 first)",
            path.display()
        )));
    }
    Ok(())
}

fn preprocess(mut x: ArrayD<f32>, pre: Preprocess, path: &Path) -> Result<ArrayD<f32>> {
    if pre.normalize.is_some() {
        check_pixels(&x, path)?;
    }
    if pre.pad > 0 {
        let x4 = x
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(|_| Error::Input(format!("{}: --pad needs NCHW images", path.display())))?;
        let (n, c, h, w) = x4.dim();
        let p = pre.pad;
        let grow = |d: usize| p.checked_mul(2).and_then(|p2| d.checked_add(p2));
        let (Some(h2), Some(w2)) = (grow(h), grow(w)) else {
            return Err(Error::Input(format!("--pad {p}: the padded image size overflows")));
        };
        crate::limits::check_shape(&[n, c, h2, w2], 4, &format!("--pad {p}"))
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let mut out = Array4::<f32>::from_elem((n, c, h2, w2), pre.pad_value);
        out.slice_mut(s![.., .., p..p + h, p..p + w]).assign(&x4);
        x = out.into_dyn();
    }
    if let Some((m, s)) = pre.normalize {
        x.mapv_inplace(|v| (v - m) / s);
    }
    Ok(x)
}

/// Load integer class labels (`.npy`, IDX labels, or the labels of a CIFAR `.bin`; for
/// CIFAR-100 the fine label).
pub fn load_labels(path: &Path) -> Result<Vec<i64>> {
    let bytes = read_bytes(path)?;
    match kind(path, &bytes)? {
        Kind::Npy => {
            crate::data::check_npy(&bytes, path)?;
            crate::data::labels_from_npy(&bytes, path)
        }
        Kind::Idx => {
            let (_, dims, off) = idx_header(path, &bytes)?;
            if dims.len() != 1 {
                return Err(Error::Input(format!(
                    "{}: IDX labels must be 1-D, got {dims:?}",
                    path.display()
                )));
            }
            Ok(bytes[off..].iter().map(|&b| b as i64).collect())
        }
        Kind::Cifar { label_bytes } => Ok(bytes
            .chunks_exact(label_bytes + 3072)
            .map(|r| r[label_bytes - 1] as i64)
            .collect()),
    }
}

/// Where data comes from: a file, or values already in memory with the name messages give
/// them.
pub enum Source<T> {
    File(PathBuf),
    Memory { data: T, name: String },
}

/// Images: a file [`load_images`] reads (`.npy`, IDX, CIFAR) or a float32 NCHW array.
pub type Images = Source<ArrayD<f32>>;

/// Labels: a file [`load_labels`] reads or integer labels.
pub type Labels = Source<Vec<i64>>;

impl<T> Source<T> {
    /// The file, or the name of the values in memory.
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Memory { name, .. } => name.clone(),
        }
    }
}

impl Images {
    /// The images as float32 NCHW, preprocessed.
    pub fn load(self, pre: Preprocess) -> Result<ArrayD<f32>> {
        match self {
            Source::File(p) => load_images(&p, pre),
            Source::Memory { data, name } => preprocess(data, pre, Path::new(&name)),
        }
    }
}

impl Labels {
    pub fn load(self) -> Result<Vec<i64>> {
        match self {
            Source::File(p) => load_labels(&p),
            Source::Memory { data, .. } => Ok(data),
        }
    }
}

/// Images with one integer label each, at least one (`eval`, accuracy-driven masking).
pub struct Labelled {
    images: ArrayD<f32>,
    labels: Vec<i64>,
}

impl Labelled {
    /// Load both; an error names both sources when the counts differ or there are no images.
    pub fn load(images: Images, labels: Labels, pre: Preprocess) -> Result<Labelled> {
        let (images_name, labels_name) = (images.name(), labels.name());
        let (x, y) = (images.load(pre)?, labels.load()?);
        let n = x.shape().first().copied().unwrap_or(0);
        if n == 0 || n != y.len() {
            return Err(Error::Input(format!(
                "{images_name} holds {n} images but {labels_name} holds {} labels",
                y.len()
            )));
        }
        Ok(Labelled { images: x, labels: y })
    }

    pub fn images(&self) -> &ArrayD<f32> {
        &self.images
    }

    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    pub fn into_parts(self) -> (ArrayD<f32>, Vec<i64>) {
        (self.images, self.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn idx_images_labels_gzip_normalize_and_pad() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("imgs-idx3-ubyte.gz");
        let raw = idx(&[2, 2, 3], &[0, 255, 51, 102, 0, 0, 255, 255, 255, 0, 0, 0]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        std::fs::write(&img, gz.finish().unwrap()).unwrap();
        let x = load_images(&img, Preprocess::default()).unwrap();
        assert_eq!(x.shape(), &[2, 1, 2, 3]);
        assert_eq!(x[[0, 0, 0, 1]], 1.0);
        assert!((x[[0, 0, 0, 2]] - 0.2).abs() < 1e-6);
        let pre = Preprocess {
            normalize: Some((0.5, 0.25)),
            pad: 2,
            pad_value: 0.0,
        };
        let y = load_images(&img, pre).unwrap();
        assert_eq!(y.shape(), &[2, 1, 6, 7]);
        assert_eq!(y[[0, 0, 0, 0]], -2.0, "pixel-space padding: (0 - 0.5) / 0.25");
        assert!((y[[0, 0, 2, 3]] - 2.0).abs() < 1e-6, "(1 - 0.5) / 0.25");
        let z = load_images(&img, Preprocess { pad_value: 0.5, ..pre }).unwrap();
        assert_eq!(z[[1, 0, 5, 6]], 0.0, "padding with the mean is zero after normalizing");
        assert_eq!(z.slice(s![.., .., 2..4, 2..5]), y.slice(s![.., .., 2..4, 2..5]));
        let lab = dir.path().join("labels-idx1-ubyte");
        std::fs::write(&lab, idx(&[3], &[7, 0, 9])).unwrap();
        assert_eq!(load_labels(&lab).unwrap(), vec![7, 0, 9]);
        std::fs::write(&lab, idx(&[4], &[7, 0, 9])).unwrap();
        assert!(load_labels(&lab).unwrap_err().to_string().contains("promises 4 values"));
    }

    #[test]
    fn normalize_refuses_values_that_are_not_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let pre = Preprocess {
            normalize: Some((0.13, 0.31)),
            ..Default::default()
        };
        let x = crate::ir::Tensor::f32(&[1, 1, 2, 2], vec![0.0, 0.5, 1.0, 0.25]).unwrap();
        crate::data::write_npy(&p, &x).unwrap();
        assert!(load_images(&p, pre).is_ok());
        let x = crate::ir::Tensor::f32(&[1, 1, 2, 2], vec![-0.42, 0.5, 2.8, 0.25]).unwrap();
        crate::data::write_npy(&p, &x).unwrap();
        let e = load_images(&p, pre).unwrap_err().to_string();
        assert!(
            e.contains("x.npy") && e.contains("[-0.42, 2.8]") && e.contains("already normalized"),
            "{e}"
        );
        assert!(
            load_images(&p, Preprocess::default()).is_ok(),
            "without --normalize any values load"
        );
    }

    #[test]
    fn gzipped_npy_is_read_from_the_decompressed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("x.npy");
        let x = crate::ir::Tensor::f32(&[2, 1, 2, 2], (0..8).map(|v| v as f32).collect()).unwrap();
        crate::data::write_npy(&plain, &x).unwrap();
        let labels = dir.path().join("y.npy");
        crate::data::write_npy(&labels, &crate::ir::Tensor::i64_vec(vec![3, 1])).unwrap();
        let gzip = |src: &Path, name: &str| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, &std::fs::read(src).unwrap()).unwrap();
            let p = dir.path().join(name);
            std::fs::write(&p, gz.finish().unwrap()).unwrap();
            p
        };
        let xg = gzip(&plain, "x.npy.gz");
        let got = load_images(&xg, Preprocess::default()).unwrap();
        assert_eq!(got, *x.as_f32().unwrap());
        assert_eq!(load_labels(&gzip(&labels, "y.npy.gz")).unwrap(), vec![3, 1]);
    }

    #[test]
    fn cifar10_and_cifar100_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut ten = Vec::new();
        for i in 0..3u8 {
            ten.push(i + 1);
            ten.extend((0..3072).map(|p| ((p % 256) as u8).wrapping_add(i)));
        }
        let p10 = dir.path().join("data_batch_1.bin");
        std::fs::write(&p10, &ten).unwrap();
        let x = load_images(&p10, Preprocess::default()).unwrap();
        assert_eq!(x.shape(), &[3, 3, 32, 32]);
        assert_eq!(x[[1, 0, 0, 1]], 2.0 / 255.0, "pixel 1 of image 1, red plane");
        assert_eq!(
            x[[0, 1, 0, 0]],
            (1024 % 256) as f32 / 255.0,
            "green plane starts at byte 1024"
        );
        assert_eq!(load_labels(&p10).unwrap(), vec![1, 2, 3]);
        let mut hundred = Vec::new();
        for i in 0..2u8 {
            hundred.extend([i, 50 + i]);
            hundred.extend(std::iter::repeat_n(9u8, 3072));
        }
        let p100 = dir.path().join("train.bin");
        std::fs::write(&p100, &hundred).unwrap();
        assert_eq!(load_labels(&p100).unwrap(), vec![50, 51], "fine labels");
        assert_eq!(
            load_images(&p100, Preprocess::default()).unwrap().shape(),
            &[2, 3, 32, 32]
        );
        let bad = dir.path().join("x.bin");
        std::fs::write(&bad, [0u8; 100]).unwrap();
        assert!(load_images(&bad, Preprocess::default()).is_err());
    }
}
