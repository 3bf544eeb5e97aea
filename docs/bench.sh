#!/usr/bin/env bash
# Regenerates the measurements quoted in docs/BENCHMARKS.md (not part of CI: it times things).
# Usage: docs/bench.sh [OUT_DIR]   — needs only the Rust toolchain and the committed fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/tabconv-bench}
mkdir -p "$out"
cargo build --release --bins
T=target/release

echo "== lookup kernel vs GEMM throughput"
cargo test --release --lib lut_throughput -- --ignored --nocapture 2>&1 | grep -vE '^(running|test |$)'

compile() { # model dataset name extra...
  local m=$1 ds=$2 name=$3; shift 3
  "$T/tabconv-compile" "fixtures/models/$m.onnx" -o "$out/$m.$name.tcv" --calib "fixtures/data/${ds}_calib.npy" \
    --report "$out/$m.$name.json" "$@" 2>"$out/$m.$name.log"
}
for spec in lenet5:mnist nin:mnist resnet18_fmnist:fmnist; do
  m=${spec%%:*}; ds=${spec##*:}
  "$T/tabconv-compile" "fixtures/models/$m.onnx" -o "$out/$m.exact.tcv" --pipeline exact 2>/dev/null
  # the default pipeline (auto encoder, masking to logit cosine 0.995), and every layer as a LUT
  compile "$m" "$ds" default
  all_lut=(--set mask.min_logit_cosine=0 --set mask.restore_unprofitable=false --set mask.relearn=false)
  compile "$m" "$ds" argmin --set lut.encoder=argmin "${all_lut[@]}"
  compile "$m" "$ds" tree --set lut.encoder=tree "${all_lut[@]}"
  for v in onnx exact.tcv default.tcv argmin.tcv tree.tcv; do
    f="$out/$m.$v"; [ "$v" = onnx ] && f="fixtures/models/$m.onnx"
    "$T/tabconv" eval "$f" --inputs "fixtures/data/${ds}_test.npy" --labels "fixtures/data/${ds}_test_labels.npy"
  done
  for b in 1 32; do
    "$T/tabconv" bench "fixtures/models/$m.onnx" "$out/$m.exact.tcv" "$out/$m.default.tcv" "$out/$m.argmin.tcv" \
      "$out/$m.tree.tcv" --batch $b --seconds 3
  done
  for v in default argmin tree; do echo "-- $m.$v"; tail -n 3 "$out/$m.$v.log"; done
done
