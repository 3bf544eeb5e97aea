//! The trained fixture models (fixtures/generate.py): our interpreter against stored ONNX
//! Runtime outputs and against tract, and `eval` accuracy equal to ONNX Runtime's on the
//! 2000-image test subsets.

mod common;
use common::*;
use ndarray::Axis;
use serde_json::Value;
use std::process::Command;
use tabconv::interp::Plan;
use tabconv::ir::Tensor;

fn summary() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected/summary.json")).unwrap()).unwrap()
}

fn models() -> Vec<(String, Value)> {
    let s = summary();
    let m = s["models"].as_object().expect("models").clone();
    assert!(m.len() >= 4, "expected lenet5, lenet5_dynamo, nin, resnet18_fmnist");
    m.into_iter().collect()
}

#[test]
fn fixture_models_match_onnx_runtime_and_tract() {
    for (name, info) in models() {
        let model = fixture(info["onnx"].as_str().unwrap());
        let x = npy(info["input"].as_str().unwrap());
        let want = npy(info["ort_output"].as_str().unwrap());
        let ours = run_ours(&model, std::slice::from_ref(&x)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let e = rel_err(&as_f32(&ours[0]), &want);
        assert!(e <= 1e-4, "{name}: error {e:e} vs ONNX Runtime");
        let (fast, nhwc) = run_ours_optimized(&model, std::slice::from_ref(&x)).unwrap();
        let e = rel_err(&as_f32(&fast[0]), &want);
        assert!(e <= 1e-4, "{name} with the run rewrites: error {e:e} vs ONNX Runtime");
        // every conv runs channels-last (the ViT has one, its patch embedding; the MLP none)
        let convs = info["op_histogram"]["Conv"].as_u64().unwrap_or(0) as usize;
        assert!(
            nhwc >= convs.min(2),
            "{name}: only {nhwc} channels-last convs of {convs}"
        );
        let theirs = run_tract(&model, &[x]);
        let e = rel_err(&as_f32(&ours[0]), &theirs[0]);
        assert!(e <= 1e-4, "{name}: error {e:e} vs tract");
    }
}

/// The test images as the model was trained on them: the fixtures' `.npy` holds pixels in
/// [0, 1]; a model trained on padded, normalized images records its `pad` and `normalize`.
fn test_images(info: &Value, rel: &str) -> ndarray::ArrayD<f32> {
    let pre = tabconv::dataset::Preprocess {
        normalize: info["normalize"]
            .as_array()
            .map(|v| (v[0].as_f64().unwrap() as f32, v[1].as_f64().unwrap() as f32)),
        pad: info["pad"].as_u64().unwrap_or(0) as usize,
        pad_value: 0.0,
    };
    tabconv::dataset::load_images(&fixture(rel), pre).unwrap()
}

#[test]
fn accuracy_equals_onnx_runtime_on_test_subsets() {
    let s = summary();
    for (name, info) in models() {
        let ds = &s["data"][info["dataset"].as_str().unwrap()];
        let x = test_images(&info, ds["test"].as_str().unwrap());
        let y = tabconv::data::read_labels(&fixture(ds["test_labels"].as_str().unwrap())).unwrap();
        // as `tabconv eval` runs it: with the run rewrites
        let graph = tabconv::model::load_for_run(&fixture(info["onnx"].as_str().unwrap())).unwrap();
        let plan = Plan::new(&graph).unwrap();
        let batch = info["fixed_batch"].as_u64().unwrap_or(100) as usize;
        let mut correct = 0;
        for (i, chunk) in x.axis_chunks_iter(Axis(0), batch).enumerate() {
            let out = plan.run(vec![Tensor::F32(chunk.to_owned())]).unwrap();
            let pred = tabconv::model::argmax_rows(out[0].as_f32().unwrap());
            assert_eq!(pred.len(), chunk.len_of(Axis(0)), "{name}: one prediction per image");
            correct += pred.iter().zip(&y[i * batch..]).filter(|(p, l)| p == l).count();
        }
        let ort = info["ort_top1_accuracy"].as_f64().unwrap();
        let ort_correct = (ort * y.len() as f64).round() as usize;
        assert_eq!(
            correct,
            ort_correct,
            "{name}: {correct}/{} correct, ONNX Runtime {ort_correct}",
            y.len()
        );
    }
}

#[test]
fn cli_eval_json_and_run_agree_with_onnx_runtime() {
    let s = summary();
    let info = &s["models"]["lenet5"];
    let bin = env!("CARGO_BIN_EXE_tabconv");
    let out = Command::new(bin)
        .args([
            "eval",
            fixture("models/lenet5.onnx").to_str().unwrap(),
            "--json",
            "--batch",
            "256",
        ])
        .args(["--inputs", fixture("data/mnist_test.npy").to_str().unwrap()])
        .args(["--labels", fixture("data/mnist_test_labels.npy").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["samples"], 2000);
    assert!(v["images_per_second"].as_f64().unwrap() > 0.0);
    assert!((v["accuracy"].as_f64().unwrap() - info["ort_top1_accuracy"].as_f64().unwrap()).abs() < 1e-9);

    let dir = tempfile::tempdir().unwrap();
    let y = dir.path().join("y.npy");
    let st = Command::new(bin)
        .args(["run", fixture("models/lenet5_dynamo.onnx").to_str().unwrap()])
        .args(["--input", fixture("expected/lenet5_dynamo_input.npy").to_str().unwrap()])
        .args(["--output", y.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let got = tabconv::data::read_f32(&y).unwrap();
    assert!(rel_err(&got, &npy("expected/lenet5_dynamo_ort.npy")) <= 1e-4);
}

/// `eval --pad 2 --normalize` pads in pixel space, as torchvision's `Pad` before `Normalize`:
/// the fixture trained that way reads ONNX Runtime's accuracy on correctly preprocessed images;
/// `--pad-value MEAN` (zeros after normalizing, the old behaviour) reads the lower accuracy ONNX
/// Runtime gets on such images.
#[test]
fn eval_pads_in_pixel_space_like_torchvision() {
    let s = summary();
    let info = &s["models"]["padded_fmnist"];
    let [mean, std] = [0, 1].map(|i| info["normalize"][i].as_f64().unwrap());
    let eval = |extra: &[&str]| -> f64 {
        let out = Command::new(env!("CARGO_BIN_EXE_tabconv"))
            .args(["eval", fixture("models/padded_fmnist.onnx").to_str().unwrap(), "--json"])
            .args(["--inputs", fixture("data/fmnist_test.npy").to_str().unwrap()])
            .args(["--labels", fixture("data/fmnist_test_labels.npy").to_str().unwrap()])
            .args(["--normalize", &format!("{mean},{std}"), "--pad", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        v["accuracy"].as_f64().unwrap()
    };
    let right = info["ort_top1_accuracy"].as_f64().unwrap();
    let wrong = info["ort_top1_accuracy_zero_pad_after_normalize"].as_f64().unwrap();
    assert!(
        right - wrong > 0.005,
        "the fixture must tell the paddings apart ({right} vs {wrong})"
    );
    // one image either way: float rounding of the normalization may flip a borderline image
    assert!((eval(&[]) - right).abs() <= 0.0005 + 1e-9, "pixel-space padding");
    assert!(
        (eval(&["--pad-value", &mean.to_string()]) - wrong).abs() <= 0.0005 + 1e-9,
        "padding after normalizing"
    );
}

/// `bench` on a `.onnx` has a tract row: timed with the `tract` feature, otherwise reported as
/// not built, like an engine that fails; `--no-tract` leaves it out.
#[test]
fn cli_bench_reports_tract_or_why_not() {
    let model = fixture("models/lenet5.onnx");
    let bench = |extra: &[&str]| -> Vec<Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_tabconv"))
            .args([
                "bench",
                model.to_str().unwrap(),
                "--no-ort",
                "--seconds",
                "0.1",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("a JSON array")
    };
    let rows = bench(&[]);
    let engines: Vec<_> = rows.iter().map(|r| r["engine"].as_str().unwrap()).collect();
    assert_eq!(engines, ["tabconv", "tract"]);
    if cfg!(feature = "tract") {
        assert!(rows[1]["median_ms"].as_f64().unwrap() > 0.0, "{}", rows[1]);
    } else {
        assert_eq!(rows[1]["error"], tabconv::bench::TRACT_NOT_BUILT);
    }
    assert_eq!(bench(&["--no-tract"]).len(), 1);
}
