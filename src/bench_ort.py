# Times ONNX Runtime on one model for `tabconv bench` (embedded in the binary, run with python3).
# argv: model.onnx input.npy threads seconds min_runs
# Prints one JSON object: {"version", "runs", "median_ms", "min_ms"} or {"error": "..."}.
import json
import sys
import time


def main():
    model, inp, threads, seconds, min_runs = sys.argv[1:6]
    threads, seconds, min_runs = int(threads), float(seconds), int(min_runs)
    try:
        import numpy as np
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001 - reported to the user as the engine's failure
        print(json.dumps({"error": f"python3 cannot import onnxruntime/numpy ({e}); pip install onnxruntime"}))
        return
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        x = np.load(inp)
        # A file that declares a fixed batch runs the images in chunks of it (the last padded).
        fixed = sess.get_inputs()[0].shape[0]
        chunk = fixed if isinstance(fixed, int) and fixed > 0 and fixed != len(x) else None
        if chunk:
            pad = -len(x) % chunk
            xs = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
            feeds = [{sess.get_inputs()[0].name: xs[i:i + chunk]} for i in range(0, len(xs), chunk)]
        else:
            feeds = [{sess.get_inputs()[0].name: x}]

        def run():
            for feed in feeds:
                sess.run(None, feed)

        # warm-up and run count as in `measure` (src/bench.rs)
        warm, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - warm < min(seconds / 10, 0.3):
            run()
            calls += 1
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < 100_000):
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(json.dumps({
            "version": ort.__version__,
            "runs": len(times),
            "median_ms": times[len(times) // 2],
            "min_ms": times[0],
            "chunk": chunk,
        }))
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        print(json.dumps({"error": f"onnxruntime: {msg[0] if msg else type(e).__name__}"}))


main()
