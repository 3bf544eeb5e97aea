"""Tests of the Python binding against the CLI, ONNX Runtime and the shipped fixtures.

The CLI comparisons run the `tabconv` and `tabconv-compile` binaries from TABCONV_BIN_DIR
(.ci/run sets it to target/debug after `cargo test` built them), else from target/release or
target/debug of this checkout.
"""

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tabconv

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
SUMMARY = json.loads((FIX / "expected" / "summary.json").read_text())["models"]
LENET = FIX / "models" / "lenet5.onnx"
MNIST_CALIB = FIX / "data" / "mnist_calib.npy"
MNIST_TEST = FIX / "data" / "mnist_test.npy"
MNIST_LABELS = FIX / "data" / "mnist_test_labels.npy"
# LeNet's layers are too small for lookups to pay, and as lookups its logits fall below the
# default cosine target on the held-out calibration images, so by default they all stay exact;
# keep some as lookups (its two convolutions) so that the lookup kernels run (a logit cosine
# target only: the default pipeline's expected-drop target is lifted)
AS_LOOKUPS = {"mask.restore_unprofitable": False, "mask.min_logit_cosine": 0.99, "mask.max_expected_drop": None}


def binary(name):
    configured = os.environ.get("TABCONV_BIN_DIR")
    if configured:
        path = Path(configured) / name
        assert path.exists(), f"TABCONV_BIN_DIR has no {name}"
        return path
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / name
        if path.exists():
            return path
    pytest.skip(f"no {name} binary: run cargo build, or set TABCONV_BIN_DIR")


def cli(name, *args, check=True):
    r = subprocess.run([str(binary(name)), *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def rel_err(got, want):
    """The largest absolute difference over the largest magnitude (as tests/common does)."""
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1.0))


def without_timings(v):
    if isinstance(v, dict):
        return {k: without_timings(x) for k, x in v.items() if not k.startswith(("seconds", "millis"))}
    if isinstance(v, list):
        return [without_timings(x) for x in v]
    return v


@pytest.fixture(scope="module")
def lut_tcv(tmp_path_factory):
    """LeNet-5 compiled into lookups, with its report."""
    out = tmp_path_factory.mktemp("lut") / "lenet5.tcv"
    report = tabconv.compile(LENET, out, calib=MNIST_CALIB, set=AS_LOOKUPS)
    return out, report


@pytest.mark.parametrize("name", ["lenet5", "lenet5_dynamo", "nin", "mobilenet_fmnist", "resnet18_fmnist"])
def test_onnx_runs_as_onnx_runtime_did(name):
    info = SUMMARY[name]
    got = tabconv.load(FIX / info["onnx"]).run(np.load(FIX / info["input"]))
    want = np.load(FIX / info["ort_output"])
    assert got.dtype == np.float32
    assert rel_err(got, want) <= 1e-4


def test_exact_compile_runs_as_the_cli_and_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    tcv = tmp_path / "lenet5.tcv"
    report = tabconv.compile(LENET, tcv, pipeline="exact")
    assert report["report"]["pipeline"] == "exact" and report["report"]["lut_layers"] == []
    x = np.load(MNIST_TEST)[100:164]
    got = tabconv.load(tcv).run(x)
    np.save(tmp_path / "x.npy", x)
    cli("tabconv", "run", tcv, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert np.array_equal(got, np.load(tmp_path / "y.npy"))
    session = ort.InferenceSession(str(LENET), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert rel_err(got, want) <= 1e-4


def test_lookup_model_runs_as_the_cli(lut_tcv, tmp_path):
    tcv, _ = lut_tcv
    x = np.load(MNIST_TEST)[:50]
    m = tabconv.load(tcv)
    got = m.run(x)
    np.save(tmp_path / "x.npy", x)
    cli("tabconv", "run", tcv, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert np.array_equal(got, np.load(tmp_path / "y.npy"))
    (only,) = m.run_all(x)
    assert np.array_equal(only, got)
    assert m.inputs == ["input"] and m.outputs == ["logits"] and m.path == tcv


def test_lowered_onnx_runs_in_onnx_runtime_as_the_tcv_in_tabconv(tmp_path):
    """`emit="onnx"`: standard operators only, and ONNX Runtime on it gives the .tcv's outputs."""
    ort = pytest.importorskip("onnxruntime")
    onnx_path, tcv = tmp_path / "lenet5.onnx", tmp_path / "lenet5.tcv"
    # every layer as lookups (both encoders, conv and fc layers)
    options = {**AS_LOOKUPS, "mask.min_logit_cosine": 0.0}
    tabconv.compile(LENET, tcv, calib=MNIST_CALIB, set=options)
    tabconv.compile(LENET, onnx_path, calib=MNIST_CALIB, set=options, emit="onnx")
    x, y = np.load(MNIST_TEST), np.load(MNIST_LABELS)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    lowered = session.run(None, {session.get_inputs()[0].name: x})[0]
    ours = tabconv.load(tcv).run(x)
    # ONNX Runtime's MatMul sums the f32 argmin distances in another order than tabconv's
    # encoder, so an image whose two nearest prototypes are within rounding of each other may
    # take the other code: images may differ only there (ties read from the lowered graph)
    scale = max(np.abs(ours).max(), 1.0)
    differ = np.nonzero(np.abs(lowered - ours).max(1) > 1e-4 * scale)[0]
    assert len(differ) <= 2, differ
    if len(differ):
        gaps = argmin_gaps(onnx_path, x[differ])
        assert all(g <= 1e-6 for g in gaps), gaps
    same = np.setdiff1d(np.arange(len(x)), differ)
    assert rel_err(lowered[same], ours[same]) <= 1e-4
    assert np.array_equal(lowered[same].argmax(1), ours[same].argmax(1))
    assert (lowered.argmax(1) == y).mean() > 0.9


def argmin_gaps(onnx_path, x):
    """Per image, the smallest gap between the two nearest prototypes of any `ArgMin` of the
    lowered graph, relative to the largest distance of that `ArgMin`."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = onnx.load(str(onnx_path))
    dist = [n.input[0] for n in m.graph.node if n.op_type == "ArgMin"]
    for name in dist:
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    gaps = []
    for img in x:
        outs = s.run(dist, {s.get_inputs()[0].name: img[None]})
        rel = [np.diff(np.sort(d, axis=-1)[..., :2], axis=-1).min() / max(np.abs(d).max(), 1.0) for d in outs]
        gaps.append(float(min(rel)))
    return gaps


def test_compile_report_is_the_clis_and_counts_the_layers(lut_tcv, tmp_path):
    tcv, report = lut_tcv
    cli_tcv = tmp_path / "cli.tcv"
    cli(
        "tabconv-compile", LENET, "-o", cli_tcv, "--calib", MNIST_CALIB,
        "--set", "mask.restore_unprofitable=false", "--set", "mask.min_logit_cosine=0.99",
        "--set", "mask.max_expected_drop=null",
        "--report", tmp_path / "report.json",
    )
    assert tcv.read_bytes() == cli_tcv.read_bytes()
    want = json.loads((tmp_path / "report.json").read_text())
    assert report["output"] == str(tcv) and report["output_bytes"] == tcv.stat().st_size
    del report["output"], want["output"]
    assert without_timings(report) == without_timings(want)
    # two convolutions and three fully connected layers learned, as many masking decisions, and
    # as many lookup layers in the model as were kept
    assert [layer["kind"] for layer in report["report"]["lut_layers"]] == ["conv"] * 2 + ["fc"] * 3
    chosen = [d["chosen"] for d in report["report"]["mask"]["layers"]]
    assert len(chosen) == 5
    histogram = json.loads(cli("tabconv", "inspect", tcv, "--json").stdout)["op_histogram"]
    assert histogram.get("LutMatMul", 0) == chosen.count("lut") >= 1


def test_compiling_twice_gives_the_same_bytes_from_arrays_or_paths(lut_tcv, tmp_path):
    tcv, _ = lut_tcv
    calib = np.load(MNIST_CALIB)
    for name in ("a.tcv", "b.tcv"):
        tabconv.compile(str(LENET), tmp_path / name, calib=calib, set=AS_LOOKUPS)
    assert (tmp_path / "a.tcv").read_bytes() == (tmp_path / "b.tcv").read_bytes() == tcv.read_bytes()


def test_accuracy_driven_compile_with_arrays_meets_its_budget(tmp_path):
    x, y = np.load(MNIST_TEST)[:400], np.load(MNIST_LABELS)[:400]
    out = tmp_path / "m.tcv"
    report = tabconv.compile(
        LENET, out, calib=np.load(MNIST_CALIB)[:256], val=x, val_labels=y.astype(np.int32),
        set={"mask.max_accuracy_drop": 1.0, "mask.restore_unprofitable": False, "mask.confirm": 0},
    )
    mask = report["report"]["mask"]
    # the point of the model written; `confirm: 0` chooses on all 400 images (held-out
    # confirmation: tests/mask.rs)
    chosen = mask["kept_point"]
    after = mask.get("pruned_after_relearning") or [mask["final_point"]]
    assert chosen == (after[-1] or (mask.get("pruned") or [mask["path"][mask["chosen_point"]]])[-1])
    assert mask["exact_accuracy"] - chosen["accuracy"] <= 0.01 + 1e-12
    assert tabconv.load(out).eval(x, y)["accuracy"] == pytest.approx(chosen["accuracy"])


def test_eval_is_the_clis_and_onnx_runtimes(lut_tcv):
    tcv, _ = lut_tcv
    for model, ort_accuracy in ((LENET, SUMMARY["lenet5"]["ort_top1_accuracy"]), (tcv, None)):
        e = tabconv.load(model).eval(MNIST_TEST, MNIST_LABELS)
        want = json.loads(
            cli("tabconv", "eval", model, "--inputs", MNIST_TEST, "--labels", MNIST_LABELS, "--json").stdout
        )
        assert set(e) == set(want)
        assert (e["accuracy"], e["correct"], e["samples"], e["batch"]) == (
            want["accuracy"], want["correct"], want["samples"], want["batch"])
        assert ort_accuracy is None or e["accuracy"] == ort_accuracy
        # arrays instead of files, int32 labels, another batch size: the same count
        again = tabconv.load(model).eval(np.load(MNIST_TEST), np.load(MNIST_LABELS).astype(np.int32), batch=7)
        assert again["correct"] == e["correct"] and again["batch"] == 7


def test_a_missing_file_raises_the_clis_message(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(tabconv.TabconvError) as e:
        tabconv.load(missing)
    assert str(missing) in str(e.value)
    r = cli("tabconv", "run", missing, "--input", MNIST_TEST, "--output", tmp_path / "y.npy", check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {e.value}"


def test_a_failed_compile_names_the_file_and_writes_nothing(tmp_path):
    out = tmp_path / "x.tcv"
    with pytest.raises(tabconv.TabconvError, match="missing.npy"):
        tabconv.compile(LENET, out, calib=tmp_path / "missing.npy")
    with pytest.raises(tabconv.TabconvError, match="no pass named 'nope'"):
        tabconv.compile(LENET, out, calib=MNIST_CALIB, set={"nope.k": 4})
    with pytest.raises(tabconv.TabconvError, match=r"calib: calibration shape \[4, 3, 28, 28\] does not fit"):
        tabconv.compile(LENET, out, calib=np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(tabconv.TabconvError, match="val holds 4 images but val_labels holds 3 labels"):
        tabconv.compile(LENET, out, calib=MNIST_CALIB, val=np.zeros((4, 1, 28, 28)), val_labels=[1, 2, 3])
    r = cli("tabconv-compile", LENET, "-o", out, "--calib", tmp_path / "missing.npy", check=False)
    assert r.returncode == 1
    with pytest.raises(tabconv.TabconvError) as e:
        tabconv.compile(LENET, out, calib=tmp_path / "missing.npy")
    assert r.stderr.strip() == f"error: {e.value}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(2, 1, 27, 28), (2, 28, 28), (2, 3, 28, 28), (784,)])
def test_a_wrong_input_shape_raises_and_the_model_still_runs(shape):
    m = tabconv.load(LENET)
    with pytest.raises(tabconv.TabconvError, match=r"lenet5.onnx: .*input 'input' expects"):
        m.run(np.zeros(shape, np.float32))
    assert m.run(np.load(MNIST_TEST)[:3]).shape == (3, 10)


def test_wrong_argument_types_raise_type_errors():
    m = tabconv.load(LENET)
    with pytest.raises(TypeError, match="x: expected a path or an array of floats, got an array of int64"):
        m.run(np.zeros((1, 1, 28, 28), np.int64))
    with pytest.raises(TypeError, match="y: expected a path or an array of integers, got an array of float32"):
        m.eval(MNIST_TEST, np.zeros(2000, np.float32))
    with pytest.raises(tabconv.TabconvError, match="--batch 0"):
        m.eval(MNIST_TEST, MNIST_LABELS, batch=0)


def ticks_during(work):
    """How often a Python thread that sleeps 5 ms between ticks ticked while `work` ran, and
    for how long it ran (a call holding the GIL lets it tick at most once)."""
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.005)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.05)
        start = time.monotonic()
        work()
        end = time.monotonic()
    finally:
        stop.set()
        thread.join()
    return sum(start < t < end for t in ticks), end - start


def test_compile_and_run_let_other_python_threads_run(tmp_path):
    ticks, seconds = ticks_during(lambda: tabconv.compile(LENET, tmp_path / "x.tcv", calib=MNIST_CALIB))
    assert seconds > 0.3 and ticks >= 10, (ticks, seconds)
    m = tabconv.load(FIX / "models" / "resnet18_fmnist.onnx")
    x = np.load(FIX / "data" / "fmnist_test.npy")
    ticks, seconds = ticks_during(lambda: m.run(x))
    assert seconds > 0.1 and ticks >= 5, (ticks, seconds)


def test_threads_sharing_a_model_get_the_same_outputs(lut_tcv):
    tcv, _ = lut_tcv
    x = np.load(MNIST_TEST)[:64]
    shared = tabconv.load(tcv)  # its first runs, which build the kernels' caches, race
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: shared.run(x), range(8)))
    want = tabconv.load(tcv).run(x)
    assert all(np.array_equal(o, want) for o in outs)


def test_ctrl_c_stops_a_compile_and_leaves_nothing(tmp_path):
    # a process started in the background by a non-interactive shell (as CI may be) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: install it here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tmp_path / "x.tcv"
        start = time.monotonic()
        tabconv.compile(LENET, out, calib=MNIST_CALIB)
        full = time.monotonic() - start
        out.unlink()
        assert full > 0.5, "the compile is too quick to interrupt reliably"
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            tabconv.compile(LENET, out, calib=MNIST_CALIB)
        assert time.monotonic() - start < full
        assert list(tmp_path.iterdir()) == []
    finally:
        signal.signal(signal.SIGINT, previous)
