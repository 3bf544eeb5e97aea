//! The `tabconv` Python module: `compile`, `load` → `Model` (`run`, `run_all`, `eval`) and
//! `TabconvError`. A thin layer over the library calls the CLI makes (`tabconv::compile`,
//! `tabconv::model::Runner`): arguments are converted while holding the GIL, the work runs
//! without it (`Python::detach`), and every `tabconv::Error` becomes a `TabconvError` with the
//! message the CLI prints after `error: `.

use numpy::{PyArray, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::path::PathBuf;
use tabconv::compile::{Emit, Job};
use tabconv::dataset::{Images, Labelled, Labels, PreArgs, Preprocess, Source};
use tabconv::ir::Tensor;
use tabconv::model::Runner;
use tabconv::passes::pipeline::Pipeline;

create_exception!(
    tabconv,
    TabconvError,
    PyException,
    "A tabconv failure: a bad file, model, option or input; the message is the CLI's."
);

/// Blocks of 4 KiB or more on 64-byte boundaries, as in the binaries (see `tabconv::alloc`):
/// the kernels' vector loads then never straddle cache lines. Only this module's allocations.
#[global_allocator]
static ALLOC: tabconv::alloc::CacheAligned = tabconv::alloc::CacheAligned;

fn err(e: tabconv::Error) -> PyErr {
    TabconvError::new_err(e.to_string())
}

/// The numpy dtypes an argument accepts: numpy's kind letters, what to call them in an error,
/// and the dtype they are converted to.
struct Accepts {
    kinds: &'static str,
    name: &'static str,
    dtype: &'static str,
}

const FLOATS: Accepts = Accepts {
    kinds: "f",
    name: "floats",
    dtype: "float32",
};
const INTEGERS: Accepts = Accepts {
    kinds: "iu",
    name: "integers",
    dtype: "int64",
};

/// `obj` as a C-contiguous numpy array of `accepts.dtype`, when its own dtype is of one of the
/// accepted kinds; `what` names the argument in the error.
fn numpy_as<'py>(obj: &Bound<'py, PyAny>, what: &str, accepts: &Accepts) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    if !accepts.kinds.contains(kind.as_str()) {
        let got: String = arr.getattr("dtype")?.str()?.extract()?;
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a path or an array of {}, got an array of {got}",
            accepts.name
        )));
    }
    np.call_method1("ascontiguousarray", (arr, accepts.dtype))
}

/// A float array (float16/32/64) as float32.
fn f32_array(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<ndarray::ArrayD<f32>> {
    let arr = numpy_as(obj, what, &FLOATS)?;
    Ok(arr.extract::<PyReadonlyArrayDyn<f32>>()?.to_owned_array())
}

/// A path (str or os.PathLike), or `None` for anything else.
fn path_of(obj: &Bound<'_, PyAny>) -> Option<PathBuf> {
    let is_path = obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__").unwrap_or(false);
    is_path.then(|| obj.extract::<PathBuf>().ok()).flatten()
}

/// Images given as a path (`.npy`, IDX, CIFAR `.bin`, as the CLI reads them) or a float array.
fn images(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Images> {
    Ok(match path_of(obj) {
        Some(p) => Source::File(p),
        None => Source::Memory {
            data: f32_array(obj, what)?,
            name: what.to_string(),
        },
    })
}

/// Labels given as a path (`.npy`, IDX, CIFAR `.bin`) or an integer array (flattened).
fn labels(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Labels> {
    Ok(match path_of(obj) {
        Some(p) => Source::File(p),
        None => {
            let arr = numpy_as(obj, what, &INTEGERS)?;
            let data = arr
                .extract::<PyReadonlyArrayDyn<i64>>()?
                .as_array()
                .iter()
                .copied()
                .collect();
            Source::Memory {
                data,
                name: what.to_string(),
            }
        }
    })
}

/// `normalize=(mean, std)`, `pad=n` and `pad_value=v` as the CLI's `--normalize MEAN,STD --pad N
/// --pad-value V` (the same checks).
fn preprocess(normalize: Option<(f32, f32)>, pad: usize, pad_value: f32) -> PyResult<Preprocess> {
    let args = PreArgs {
        normalize: normalize.map(|(mean, std)| format!("{mean},{std}")),
        pad,
        pad_value,
    };
    args.get().map_err(err)
}

/// The `--set` assignments: a dict `{"PASS.PARAM": value}` (strings as written on the command
/// line, other values as JSON, which YAML reads alike) or a list of `"PASS.PARAM=VALUE"`.
fn assignments(set: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(set) = set else { return Ok(Vec::new()) };
    if let Ok(d) = set.cast::<PyDict>() {
        let json = set.py().import("json")?;
        let mut out = Vec::new();
        for (k, v) in d.iter() {
            let value: String = match v.extract::<String>() {
                Ok(s) => s,
                Err(_) => json.call_method1("dumps", (v,))?.extract()?,
            };
            out.push(format!("{}={value}", k.extract::<String>()?));
        }
        return Ok(out);
    }
    set.extract::<Vec<String>>().map_err(|_| {
        PyTypeError::new_err("set: expected a dict {\"PASS.PARAM\": value} or a list of \"PASS.PARAM=VALUE\"")
    })
}

/// A tensor as a numpy array of its element type (no copy).
fn to_numpy(py: Python<'_>, t: Tensor) -> Bound<'_, PyAny> {
    match t {
        Tensor::F32(a) => PyArray::from_owned_array(py, a).into_any(),
        Tensor::I64(a) => PyArray::from_owned_array(py, a).into_any(),
        Tensor::I32(a) => PyArray::from_owned_array(py, a).into_any(),
        Tensor::U8(a) => PyArray::from_owned_array(py, a).into_any(),
        Tensor::I8(a) => PyArray::from_owned_array(py, a).into_any(),
        Tensor::Bool(a) => PyArray::from_owned_array(py, a).into_any(),
    }
}

/// A JSON value as Python objects (`json.loads`).
fn to_python<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// Compile an ONNX model into a `.tcv`, as `tabconv-compile` does; returns its JSON report.
///
/// `calib`, `val` (images) and `val_labels` are paths (`.npy`, IDX, CIFAR `.bin`) or numpy
/// arrays (float NCHW images, integer labels). `set` overrides pipeline options:
/// `{"mask.min_logit_cosine": 0.99}`. Python threads keep running during the compile; Ctrl-C
/// stops it after the pass in progress (nothing is written).
#[pyfunction]
#[pyo3(signature = (onnx_path, out_path, calib=None, val=None, val_labels=None, pipeline="tabconv",
                    set=None, seed=0, emit="tcv", verbose=false, normalize=None, pad=0, pad_value=0.0))]
#[allow(clippy::too_many_arguments)]
fn compile<'py>(
    py: Python<'py>,
    onnx_path: PathBuf,
    out_path: PathBuf,
    calib: Option<&Bound<'py, PyAny>>,
    val: Option<&Bound<'py, PyAny>>,
    val_labels: Option<&Bound<'py, PyAny>>,
    pipeline: &str,
    set: Option<&Bound<'py, PyAny>>,
    seed: u64,
    emit: &str,
    verbose: bool,
    normalize: Option<(f32, f32)>,
    pad: usize,
    pad_value: f32,
) -> PyResult<Bound<'py, PyAny>> {
    let mut pipe = Pipeline::find(pipeline).map_err(err)?;
    for a in assignments(set)? {
        pipe.set(&a).map_err(err)?;
    }
    let emit = match emit {
        "tcv" => Emit::Tcv,
        "onnx" => Emit::Onnx,
        other => {
            return Err(PyValueError::new_err(format!(
                "emit={other:?}: expected \"tcv\" or \"onnx\""
            )))
        }
    };
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let job = Job {
        model: onnx_path,
        output: out_path,
        pipeline: pipe,
        emit,
        calib: calib.map(|c| images(c, "calib")).transpose()?,
        val: val.map(|v| images(v, "val")).transpose()?,
        val_labels: val_labels.map(|y| labels(y, "val_labels")).transpose()?,
        pre: preprocess(normalize, pad, pad_value)?,
        seed,
        verbose,
        cancel: Some(cancel.clone()),
    };
    // Ctrl-C: Python runs its signal handlers on this (the main) thread, so the compile runs on
    // another one while this thread, without the GIL, waits for it and looks for signals every
    // 50 ms; on one it sets `cancel`, which the compile checks between passes, layers and
    // masking steps, and waits for it to stop (it removes its temporary output).
    let (tx, rx) = std::sync::mpsc::channel();
    // (a Mutex so the waiting closure, which runs without the GIL, may borrow it)
    let rx = std::sync::Mutex::new(rx);
    let recv = |timeout: Option<std::time::Duration>| {
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        }
    };
    let worker = std::thread::spawn(move || {
        let _ = tx.send(tabconv::compile::compile(job, |_, _| Ok(())));
    });
    let done = loop {
        let wait = std::time::Duration::from_millis(50);
        match py.detach(|| recv(Some(wait))) {
            Ok(done) => break done,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = py.detach(|| recv(None));
                    let _ = worker.join();
                    return Err(e);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(err(tabconv::Error::Other(
                    "the compile thread stopped without a result".into(),
                )));
            }
        }
    };
    let _ = worker.join();
    match done {
        Ok(done) => to_python(py, &done.json()),
        Err(e) => Err(err(e)),
    }
}

/// A model loaded to run: `tabconv.load(path)`.
#[pyclass(frozen, module = "tabconv")]
struct Model {
    runner: Runner,
}

/// Load a `.tcv` or an `.onnx` to run it, as `tabconv run` does (a `.onnx` gets the rewrites
/// ONNX Runtime also makes: BatchNorm folded, convolutions channels-last).
#[pyfunction]
fn load(py: Python<'_>, path: PathBuf) -> PyResult<Model> {
    let runner = py.detach(|| Runner::load(&path)).map_err(err)?;
    Ok(Model { runner })
}

impl Model {
    fn run_tensors(&self, py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Vec<Tensor>> {
        let x = Tensor::F32(f32_array(x, "x")?);
        py.detach(|| self.runner.run(vec![x])).map_err(err)
    }
}

#[pymethods]
impl Model {
    /// Run on a float32 batch shaped as the model's input (NCHW); returns the first output.
    fn run<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let first = self.run_tensors(py, x)?.into_iter().next();
        let first = first.ok_or_else(|| TabconvError::new_err("the model has no output"))?;
        Ok(to_numpy(py, first))
    }

    /// Run on a batch; returns every output, in the model's order.
    fn run_all<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let outs = self.run_tensors(py, x)?;
        PyList::new(py, outs.into_iter().map(|t| to_numpy(py, t)))
    }

    /// Top-1 accuracy of the first output on labelled images, as `tabconv eval --json` prints it.
    /// `x` and `y` are paths (`.npy`, IDX, CIFAR `.bin`) or arrays (float images, integer labels).
    #[pyo3(signature = (x, y, batch=64, normalize=None, pad=0, pad_value=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn eval<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        batch: usize,
        normalize: Option<(f32, f32)>,
        pad: usize,
        pad_value: f32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let pre = preprocess(normalize, pad, pad_value)?;
        let (x, y) = (images(x, "x")?, labels(y, "y")?);
        let e = py
            .detach(|| {
                tabconv::model::check_batch(batch)?;
                self.runner.evaluate(&Labelled::load(x, y, pre)?, batch, || ())
            })
            .map_err(err)?;
        to_python(
            py,
            &serde_json::to_value(&e).map_err(|e| TabconvError::new_err(e.to_string()))?,
        )
    }

    /// The model file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.runner.path().to_path_buf()
    }

    /// The names of the model's inputs.
    #[getter]
    fn inputs(&self) -> Vec<String> {
        let g = self.runner.graph();
        g.inputs.iter().map(|&n| g.node(n).name.clone()).collect()
    }

    /// The names of the model's outputs, in the order `run_all` returns them.
    #[getter]
    fn outputs(&self) -> Vec<String> {
        self.runner
            .graph()
            .outputs
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The CLI's note about a batch the file fixes (how it runs other batch sizes), or None.
    #[getter]
    fn batch_note(&self) -> Option<String> {
        self.runner.batch_note()
    }

    fn __repr__(&self) -> String {
        format!("tabconv.Model({:?})", self.runner.path())
    }
}

#[pymodule]
#[pyo3(name = "tabconv")]
fn tabconv_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TabconvError", m.py().get_type::<TabconvError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_class::<Model>()?;
    Ok(())
}
