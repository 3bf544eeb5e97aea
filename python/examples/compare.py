"""Compile a shipped ONNX model with tabconv and compare it with the original: top-1 accuracy on
the shipped test set and median latency per batch, the original run by ONNX Runtime when it is
installed (else by tabconv's exact interpreter, which matches it within float rounding).

    pip install ./python onnxruntime
    python python/examples/compare.py                           # LeNet-5 on MNIST, ~10 s
    python python/examples/compare.py --model mobilenet_fmnist  # ~30 s (resnet18_fmnist: minutes)

LeNet-5's layers are too small for lookups to run faster than its exact kernels, so the default
pipeline would leave them all exact; this example keeps them as lookups by default
(--restore-unprofitable gives the default pipeline's choice) to show what lookups cost and save.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import tabconv

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DATASET = {"lenet5": "mnist", "lenet5_dynamo": "mnist", "nin": "mnist",
           "mobilenet_fmnist": "fmnist", "resnet18_fmnist": "fmnist"}


def engines(onnx, compiled):
    """(label, run) for the original model in ONNX Runtime (when installed) and in tabconv's
    exact interpreter, then the compiled model; the first is the reference."""
    rows = []
    try:
        import onnxruntime as ort
    except ImportError:
        print("(onnxruntime is not installed: the reference is tabconv's exact run of the .onnx)")
    else:
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        rows.append((f"original, onnxruntime {ort.__version__}", lambda x: session.run(None, {name: x})[0]))
    rows.append(("original, tabconv (exact)", tabconv.load(onnx).run))
    rows.append(("compiled .tcv, tabconv", compiled.run))
    return rows


def accuracy(run, x, y, batch=256):
    correct = sum(int((run(x[i:i + batch]).argmax(axis=1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    return correct / len(x)


def median_ms(run, x, runs):
    run(x)  # warm-up: tabconv builds its kernels' caches on the first run
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet5", choices=sorted(DATASET))
    parser.add_argument("--batch", type=int, default=64, help="images per timed batch")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per engine")
    parser.add_argument("--restore-unprofitable", action="store_true",
                        help="let the mask pass put back layers whose lookups would run slower")
    args = parser.parse_args()

    onnx = FIXTURES / "models" / f"{args.model}.onnx"
    data = FIXTURES / "data" / DATASET[args.model]
    calib = np.load(f"{data}_calib.npy")
    x, y = np.load(f"{data}_test.npy"), np.load(f"{data}_test_labels.npy")
    # hold out the first 500 test images to steer masking, measure on the other 1500
    (val_x, val_y), (x, y) = (x[:500], y[:500]), (x[500:], y[500:])

    with tempfile.TemporaryDirectory() as tmp:
        tcv = Path(tmp) / f"{args.model}.tcv"
        start = time.perf_counter()
        report = tabconv.compile(onnx, tcv, calib=calib, val=val_x, val_labels=val_y, set={
            "mask.max_accuracy_drop": 1.0,
            "mask.restore_unprofitable": args.restore_unprofitable,
        })
        compile_s = time.perf_counter() - start
        compiled = tabconv.load(tcv)

    layers = report["report"]["mask"]["layers"]
    lookups = [d["layer"] for d in layers if d["chosen"] == "lut"]
    print(f"{args.model}: compiled in {compile_s:.1f} s; {len(lookups)} of {len(layers)} layers as lookups; "
          f"arithmetic removed: {report['reduction_everything_counted']:.1%} everything counted, "
          f"{report['reduction_lookups_only']:.1%} lookups only; {report['output_bytes']} bytes")

    rows = engines(onnx, compiled)
    batch = x[:args.batch]
    print(f"\n{'model, engine':<36} {'accuracy':>9} {f'ms / {args.batch} images':>18} {'images/s':>10}")
    for label, run in rows:
        ms = median_ms(run, batch, args.runs)
        print(f"{label:<36} {accuracy(run, x, y):>9.2%} {ms:>18.2f} {args.batch / ms * 1e3:>10.0f}")
    reference = rows[0][1](batch)
    print(f"\nlargest logit difference from the reference on the timed batch: "
          f"exact {np.abs(rows[-2][1](batch) - reference).max():.2e}, "
          f"compiled {np.abs(compiled.run(batch) - reference).max():.3f}")


if __name__ == "__main__":
    main()
