#!/usr/bin/env bash
# Regenerates docs/BENCHMARKS.md (not part of CI: it times things).
# Usage: docs/bench.sh [OUT_DIR]
# Needs the Rust toolchain and the committed fixtures; for the ONNX Runtime columns, python3 with
# `onnxruntime` and `numpy` (pip install onnxruntime numpy). If $PAPER/resnet18_mnist.onnx exists
# (docs/results.sh or fixtures/paper_models.py make it), the TabConv paper's ResNet-18 is included.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/tabconv-bench}
PAPER=${PAPER:-/tmp/tabconv_paper}
mkdir -p "$out"
cargo build --release --bins --features tract  # tract: bench's tract column
T=target/release

echo "== kernel microbenchmarks (1 thread)" | tee "$out/kernels.txt"
# the #[ignore]d tests are these measurements (speed is measured here, never asserted in tests)
RAYON_NUM_THREADS=1 cargo test --release --features tract --lib -- --ignored --nocapture \
  lut_throughput encode_throughput quantized_encode_throughput nearest_throughput nearest2_throughput packed_throughput direct_throughput depthwise_throughput --test-threads=1 2>&1 \
  | sed -E 's/^test [^ ]+ \.\.\. //' | grep -vE '^(running|ok|Compiling|Finished|Running|$)|test result' \
  | grep -vE '^ +(Compiling|Finished|Running)' | tee -a "$out/kernels.txt"

models=(lenet5:mnist nin:mnist resnet18_fmnist:fmnist mobilenet_fmnist:fmnist)
[ -f "$PAPER/resnet18_mnist.onnx" ] && models+=(paper_resnet18:mnist)
for spec in "${models[@]}"; do
  m=${spec%%:*}; ds=${spec##*:}
  src="fixtures/models/$m.onnx"; [ "$m" = paper_resnet18 ] && src="$PAPER/resnet18_mnist.onnx"
  # the default pipeline, and every layer kept as lookups (argmin encoder)
  "$T/tabconv-compile" "$src" -o "$out/$m.default.tcv" --calib "fixtures/data/${ds}_calib.npy" \
    --report "$out/$m.default.json" 2>"$out/$m.default.log"
  "$T/tabconv-compile" "$src" -o "$out/$m.all_lut.tcv" --calib "fixtures/data/${ds}_calib.npy" \
    --set mask.min_logit_cosine=0 --set mask.restore_unprofitable=false --set mask.relearn=false \
    --report "$out/$m.all_lut.json" 2>"$out/$m.all_lut.log"
  for f in "$src" "$out/$m.default.tcv" "$out/$m.all_lut.tcv"; do
    "$T/tabconv" eval "$f" --json --inputs "fixtures/data/${ds}_test.npy" --labels "fixtures/data/${ds}_test_labels.npy"
  done > "$out/$m.eval.jsonl"
  for t in 1 2; do
    for b in 1 64; do
      "$T/tabconv" bench "$src" "$out/$m.default.tcv" "$out/$m.all_lut.tcv" --batch $b --threads $t \
        --seconds 3 --json > "$out/$m.t$t.b$b.json"
    done
  done
  "$T/tabconv" bench "$out/$m.default.tcv" --batch 64 --threads 1 --seconds 1 --profile --no-ort --no-tract \
    > "$out/$m.profile.b64.txt"
  "$T/tabconv" bench "$out/$m.default.tcv" --batch 1 --threads 1 --seconds 1 --profile --no-ort --no-tract \
    > "$out/$m.profile.b1.txt"
  "$T/tabconv" bench "$src" --batch 64 --threads 1 --seconds 1 --profile --no-ort --no-tract \
    > "$out/$m.profile.exact.b64.txt"
  # our kernels capped at AVX2 (ONNX Runtime cannot be capped: it keeps its best kernels)
  TABCONV_SIMD=avx2 "$T/tabconv" bench "$src" "$out/$m.default.tcv" --batch 64 --threads 1 --seconds 2 \
    --no-tract --json > "$out/$m.avx2.b64.json"
done
python3 docs/bench_table.py "$out" "${models[@]}" > docs/BENCHMARKS.md
cat docs/BENCHMARKS.md
