//! `tabconv-compile` and pipeline files: clear errors with file/line/column, `--set`, reports,
//! atomic output, and `.tcv` models accepted by `tabconv run/eval/inspect`.

mod common;
use common::*;
use std::process::{Command, Output};
use tabconv::passes::pipeline::Pipeline;

fn compile(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pipeline_errors_name_file_line_and_column() {
    let e = Pipeline::parse(
        "name: x\npasses:\n  - fold-batchnorm:\n  - fold-batchnrom:\n",
        "my.yaml",
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("my.yaml:4:"), "{msg}");
    assert!(msg.contains("fold-batchnrom"), "{msg}");
    let e = Pipeline::parse(
        "name: x\npasses:\n  - conv-to-im2col:\n      min_macs: lots\n",
        "p.yaml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("p.yaml:4:"), "{e}");
    let e = Pipeline::parse("name: x\npasses:\n  - dead-code:\n      aggressive: true\n", "p.yaml").unwrap_err();
    assert!(e.to_string().contains("aggressive"), "{e}");
    let e = Pipeline::parse("name: x\nextra: 1\npasses: []\n", "p.yaml").unwrap_err();
    assert!(e.to_string().contains("p.yaml:2:"), "{e}");
}

#[test]
fn set_overrides_typed_options() {
    let mut p = Pipeline::find("exact").unwrap();
    p.set("conv-to-im2col.min_macs=1000000").unwrap();
    assert!(p.to_yaml().contains("min_macs: 1000000"), "{}", p.to_yaml());
    assert!(p.set("conv-to-im2col.min_macs=abc").is_err());
    assert!(p.set("conv-to-im2col.nope=1").unwrap_err().to_string().contains("nope"));
    assert!(p
        .set("lut.k=16")
        .unwrap_err()
        .to_string()
        .contains("no pass named 'lut'"));
    assert!(p.set("garbage").is_err());
}

#[test]
fn compile_writes_report_and_tcv_runs_in_tabconv() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lenet5.tcv");
    let report = dir.path().join("report.json");
    let o = compile(&[
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--pipeline",
        "exact",
        "--report",
        report.to_str().unwrap(),
        "--dump-after",
        "conv-to-im2col",
        "--seed",
        "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Im2Col("),
        "--dump-after prints the IR"
    );
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let passes = r["report"]["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 8, "the exact pipeline's passes");
    assert_eq!(
        r["report"]["macs_before"], r["report"]["macs_after"],
        "exact passes keep the MACs"
    );
    assert_eq!(r["report"]["macs_before"], 416520);
    assert_eq!(r["seed"], 7, "the report names the seed a rerun needs");

    let bin = env!("CARGO_BIN_EXE_tabconv");
    let v = Command::new(bin)
        .args(["eval", out.to_str().unwrap(), "--json"])
        .args(["--inputs", fixture("data/mnist_test.npy").to_str().unwrap()])
        .args(["--labels", fixture("data/mnist_test_labels.npy").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected/summary.json")).unwrap()).unwrap();
    assert_eq!(v["accuracy"], summary["models"]["lenet5"]["ort_top1_accuracy"]);
    // the original beside the compiled model: one line each, the second with its difference
    let two = Command::new(bin)
        .args([
            "eval",
            fixture("models/lenet5.onnx").to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .args(["--inputs", fixture("data/mnist_test.npy").to_str().unwrap()])
        .args(["--labels", fixture("data/mnist_test_labels.npy").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(two.status.success(), "{}", stderr(&two));
    let text = String::from_utf8_lossy(&two.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with(fixture("models/lenet5.onnx").to_str().unwrap()) && !lines[0].contains("vs the first")
    );
    // the exact pipeline keeps LeNet's accuracy: no difference
    assert!(lines[1].contains("+0.00 points vs the first"), "{text}");
    let i = Command::new(bin)
        .args(["inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    // the exact pipeline's convolutions end up channels-last `NhwcConv`s, shown by inspect
    let text = String::from_utf8_lossy(&i.stdout);
    assert!(text.contains("layout=nhwc") && !text.contains("Im2Col("), "{text}");
}

#[test]
fn failed_compile_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.tcv");
    let bad_pipeline = dir.path().join("bad.yaml");
    std::fs::write(&bad_pipeline, "name: bad\npasses:\n  - no-such-pass:\n").unwrap();
    let o = compile(&[
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--pipeline",
        bad_pipeline.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.yaml:3:"), "{}", stderr(&o));
    let o = compile(&[
        fixture("ops/pad_opset13_reflect.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("reflect"));
    let nan = dir.path().join("nan.npy");
    let mut x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 1, 28, 28]));
    x[[1, 0, 3, 3]] = f32::NAN;
    tabconv::data::write_npy(&nan, &tabconv::ir::Tensor::F32(x)).unwrap();
    let o = compile(&[
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        nan.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not finite"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the inputs remain: {left:?}");
}

#[test]
fn tcv_reader_rejects_plain_onnx_and_future_versions() {
    let e = tabconv::onnx::tcv::read_tcv(&fixture("models/lenet5.onnx")).unwrap_err();
    assert!(e.to_string().contains("not a .tcv file"), "{e}");
}

/// SIGINT and SIGTERM during a compile (ResNet-18 with calibration, minutes of work) end it
/// with the signal's status and leave the output folder as it was: no `.tcv`, no temp file —
/// `tabconv-compile` creates its output's temp file before the work starts, and its signal
/// handler removes it.
#[cfg(unix)]
#[test]
fn interrupted_compile_leaves_no_output() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let out_dir = tempfile::tempdir().unwrap();
        let log_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("resnet18.tcv");
        let log = log_dir.path().join("stderr.txt");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
            .arg(fixture("models/resnet18_fmnist.onnx"))
            .arg("-o")
            .arg(&out)
            .arg("--calib")
            .arg(fixture("data/fmnist_calib.npy"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let entries = || -> Vec<String> {
            std::fs::read_dir(out_dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        // working: its temp output exists and it has spent CPU time on the model (Linux)
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the compile ended before it was interrupted ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if entries().iter().any(|n| n.ends_with(".tmp")) && cpu_seconds(pid).is_none_or(|s| s >= 1.0) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "the compile did not start working within 5 minutes"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signalling our own child, which has not been waited for (its pid is still ours)
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(
            status.signal() == Some(sig) || status.code() == Some(128 + sig),
            "signal {sig}: exit {status}"
        );
        assert!(
            entries().is_empty(),
            "signal {sig} left {:?} in the output folder",
            entries()
        );
    }
}

/// CPU seconds a process has used (`/proc/PID/stat`), where the platform has it.
#[cfg(unix)]
fn cpu_seconds(pid: libc::pid_t) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name (which may hold spaces) in parentheses: utime is the 12th
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// The built-in `all-lut` pipeline is the default one without its masking pass: the same passes
/// in the same order, the same `lut` options.
#[test]
fn all_lut_is_the_default_pipeline_without_masking() {
    let default = Pipeline::find("tabconv").unwrap();
    let all_lut = Pipeline::find("all-lut").unwrap();
    let unmasked: Vec<_> = default
        .passes
        .iter()
        .filter(|p| !matches!(p, tabconv::passes::pipeline::PassSpec::Mask(_)))
        .cloned()
        .collect();
    assert_eq!(unmasked.len() + 1, default.passes.len(), "the default masks once");
    assert_eq!(all_lut.passes, unmasked);
}

/// `--list-passes` lists every option of the built-in pipelines in a form `--set` takes back.
#[test]
fn list_passes_prints_what_set_accepts() {
    let o = compile(&["--list-passes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let mut sets = 0;
    let mut pipeline = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("pipeline '").and_then(|l| l.strip_suffix("':")) {
            pipeline = Some(Pipeline::find(name).unwrap());
        } else if let Some(set) = line.trim().strip_prefix("--set ") {
            let p = pipeline.as_mut().expect("options follow a pipeline line");
            p.set(set).unwrap_or_else(|e| panic!("--set {set}: {e}"));
            sets += 1;
        }
    }
    for needle in [
        "--set lut.k=16",
        "--set mask.max_accuracy_drop=null",
        "--set lut.encoder=auto",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(sets >= 20, "{sets} options listed:\n{text}");
}

/// Options that need other flags fail once the model is loaded, before calibration; passes
/// report as they finish, also when stderr is not a terminal.
#[test]
fn missing_flags_fail_early_and_progress_streams() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.tcv");
    let lenet = fixture("models/lenet5.onnx");
    let calib = fixture("data/mnist_calib.npy");
    let args = [
        lenet.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
    ];
    let o = compile(&[&args[..], &["--set", "mask.max_accuracy_drop=0.5"]].concat());
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("--val") && !e.contains("pass lut"),
        "failed before the lut pass: {e}"
    );
    let o = compile(&args[..3]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--calib"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = compile(&[&args[..], &["--set", "lut.min_macs=100000"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    let (lut, pass) = (e.find("  lut 1/").expect(&e), e.find("  pass lut ").expect(&e));
    assert!(
        lut < pass,
        "the layer lines come as the layers are learned, before the pass line:\n{e}"
    );
}

/// The library calls the CLI and the Python binding share: calibration images from memory give
/// the bytes a file gives, errors name the in-memory source, and a `Runner` evaluates.
#[test]
fn library_compile_from_memory_and_runner() {
    use tabconv::compile::{compile, Emit, Job};
    use tabconv::dataset::{Images, Labelled, Source};
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, calib: Images| {
        let mut pipeline = Pipeline::find("tabconv").unwrap();
        pipeline.set("mask.restore_unprofitable=false").unwrap();
        Job {
            model: fixture("models/lenet5.onnx"),
            output: dir.path().join(name),
            pipeline,
            emit: Emit::Tcv,
            calib: Some(calib),
            val: None,
            val_labels: None,
            pre: Default::default(),
            seed: 0,
            verbose: false,
            cancel: None,
        }
    };
    let calib = fixture("data/mnist_calib.npy");
    let from_file = compile(job("a.tcv", Source::File(calib.clone())), |_, _| Ok(())).unwrap();
    let data = tabconv::data::read_f32(&calib).unwrap();
    let name = "calib".to_string();
    let from_memory = compile(job("b.tcv", Source::Memory { data, name }), |_, _| Ok(())).unwrap();
    let bytes = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert_eq!(bytes("a.tcv"), bytes("b.tcv"));
    assert_eq!(from_file.output_bytes, bytes("a.tcv").len());
    assert_eq!(from_memory.json()["report"]["lut_layers"].as_array().unwrap().len(), 5);

    let data = ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 3, 28, 28]));
    let name = "my images".to_string();
    let e = compile(job("c.tcv", Source::Memory { data, name }), |_, _| Ok(())).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid input: my images: calibration shape [2, 3, 28, 28]"),
        "{e}"
    );
    assert!(!dir.path().join("c.tcv").exists());

    let runner = tabconv::model::Runner::load(&dir.path().join("a.tcv")).unwrap();
    let (x, y) = (fixture("data/mnist_test.npy"), fixture("data/mnist_test_labels.npy"));
    let test = Labelled::load(Source::File(x), Source::File(y), Default::default()).unwrap();
    let mut batches = 0;
    let big = runner.evaluate(&test, 512, || batches += 1).unwrap();
    assert_eq!((batches, big.samples), (4, 2000));
    assert_eq!(runner.evaluate(&test, 7, || ()).unwrap().correct, big.correct);
    assert!(big.accuracy > 0.9, "{big:?}");

    let images = Source::Memory {
        data: ndarray::ArrayD::zeros(ndarray::IxDyn(&[3, 1, 28, 28])),
        name: "x".into(),
    };
    let labels = Source::Memory {
        data: vec![1, 2],
        name: "y".into(),
    };
    let e = Labelled::load(images, labels, Default::default()).err().unwrap();
    assert_eq!(e.to_string(), "invalid input: x holds 3 images but y holds 2 labels");
}

/// The compile holds the last quarter of the calibration images out of learning and masks on
/// them: changing those images changes what the mask measures but not one byte of the tables.
#[test]
fn mask_measures_on_calibration_images_held_out_of_learning() {
    let dir = tempfile::tempdir().unwrap();
    let calib = npy("data/mnist_calib.npy");
    let first = calib.slice(ndarray::s![..48, .., .., ..]).to_owned().into_dyn();
    let mut other = first.clone();
    // the last 12 replaced by other training images (their order reversed)
    for i in 0..12 {
        let src = calib.slice(ndarray::s![100 + i, .., .., ..]).to_owned();
        other.slice_mut(ndarray::s![47 - i, .., .., ..]).assign(&src);
    }
    let mut runs = Vec::new();
    for (name, x) in [("a", &first), ("b", &other)] {
        let c = dir.path().join(format!("{name}.npy"));
        tabconv::data::write_npy(&c, &tabconv::ir::Tensor::F32(x.clone())).unwrap();
        let (out, report) = (
            dir.path().join(format!("{name}.tcv")),
            dir.path().join(format!("{name}.json")),
        );
        let o = compile(&[
            fixture("models/lenet5.onnx").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--calib",
            c.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--set",
            "lut.learn=none",
            "--set",
            "mask.force_lut=[\"*\"]",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let mask = r["report"]["mask"].clone();
        assert_eq!(mask["measured_on"], "12 held-out calibration images");
        runs.push((
            std::fs::read(&out).unwrap(),
            mask["path"][0]["logit_cosine"].as_f64().unwrap(),
        ));
    }
    assert!(runs[0].0 == runs[1].0, "the held-out images changed the tables");
    assert_ne!(
        runs[0].1, runs[1].1,
        "the mask measured on other images than the held-out ones"
    );
}

/// An accuracy target prints the model's accuracy on the validation images held out to confirm
/// it (`mask.confirm`, half of them by default) and reports them.
#[test]
fn accuracy_target_prints_the_held_out_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report) = (dir.path().join("m.tcv"), dir.path().join("m.json"));
    let o = compile(&[
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        fixture("data/mnist_calib.npy").to_str().unwrap(),
        "--val",
        fixture("data/mnist_test.npy").to_str().unwrap(),
        "--val-labels",
        fixture("data/mnist_test_labels.npy").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--set",
        "lut.learn=none",
        "--set",
        "mask.max_accuracy_drop=0.5",
    ]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("  on 1000 held-out validation images (mask.confirm): logit cosine ")
            && e.contains("one standard error"),
        "{e}"
    );
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let mask = &r["report"]["mask"];
    assert!(
        mask["measured_on"]
            .as_str()
            .unwrap()
            .starts_with("1000 validation images (1000 more held out to confirm"),
        "{mask}"
    );
    let c = &mask["confirmation"];
    assert_eq!(c["images"], 1000, "{c}");
    let points = c["points"].as_array().unwrap();
    assert!(!points.is_empty() && points[0]["correct"].as_u64().is_some(), "{c}");
    // restores to confirm, if any, are printed with the model kept measured on both halves
    assert_eq!(points.len() > 1, e.contains("layer(s) to confirm: reduction"), "{e}");
    assert_eq!(points.len() > 1, !c["chosen_on"].is_null(), "{c}");
}

/// The same model, calibration and seed give the same `.tcv` bytes at every SIMD level from AVX2
/// up that this CPU has (`TABCONV_SIMD` caps every kernel, the GEMMs of calibration and learning
/// included): a model compiled on an AVX2 machine is the one an AVX-512 machine compiles.
/// LeNet-5 with its convolutions kept as lookups (a logit cosine target alone), learned per
/// layer and through the global stage, so the compile runs the encoders, the lookup kernels, the
/// exact GEMMs of every shape (a 10-class head, gradients of one row) and masking.
#[test]
fn tcv_bytes_do_not_depend_on_the_simd_level() {
    use tabconv::interp::kernels::Simd;
    let levels: Vec<Simd> = Simd::available().into_iter().filter(|&l| l >= Simd::Avx2).collect();
    eprintln!(
        "tcv_bytes_do_not_depend_on_the_simd_level: compiled at {:?}",
        levels.iter().map(|l| l.name()).collect::<Vec<_>>()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut compiled = vec![];
    for level in &levels {
        let out = dir.path().join(format!("lenet5.{}.tcv", level.name()));
        let o = Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
            .env("TABCONV_SIMD", level.name())
            .arg(fixture("models/lenet5.onnx"))
            .arg("-o")
            .arg(&out)
            .arg("--calib")
            .arg(fixture("data/mnist_calib.npy"))
            .args([
                "--set",
                "mask.restore_unprofitable=false",
                "--set",
                "mask.min_logit_cosine=0.99",
            ])
            .args(["--set", "mask.max_expected_drop=null", "--set", "lut.epochs=2"])
            .args(["--set", "lut.global_epochs=1", "--set", "lut.global_images=256"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}: {}", level.name(), stderr(&o));
        let m = tabconv::onnx::tcv::read_tcv(&out).unwrap();
        let luts =
            m.g.node_indices()
                .filter(|&n| m.node(n).op.name() == "LutMatMul")
                .count();
        assert!(luts >= 1, "{}: no layer kept as lookups checks nothing", level.name());
        compiled.push((level.name(), std::fs::read(&out).unwrap()));
    }
    for (name, bytes) in &compiled[1..] {
        assert!(
            *bytes == compiled[0].1,
            "the .tcv compiled at {name} differs from the one compiled at {}",
            compiled[0].0
        );
    }
}
