# Times ONNX Runtime on one model for `tabconv bench` (embedded in the binary, run with python3).
# argv: model.onnx input.npy threads
# Prints one JSON line {"version", "chunk"} once the session is loaded (or {"error": "..."}), then
# for each line "SECONDS MIN_RUNS MAX_RUNS" read from stdin times runs as src/bench.rs does and
# prints {"times": [milliseconds, ...]}; ends at the end of its input.
import json
import sys
import time


def main():
    model, inp, threads = sys.argv[1:4]
    threads = int(threads)
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

        print(json.dumps({"version": ort.__version__, "chunk": chunk}), flush=True)
        for line in sys.stdin:
            seconds, min_runs, max_runs = line.split()
            seconds, min_runs, max_runs = float(seconds), int(min_runs), int(max_runs)
            times = []
            start = time.perf_counter()
            while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < max_runs):
                t = time.perf_counter()
                run()
                times.append((time.perf_counter() - t) * 1e3)
            print(json.dumps({"times": times}), flush=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        print(json.dumps({"error": f"onnxruntime: {msg[0] if msg else type(e).__name__}"}))


main()
