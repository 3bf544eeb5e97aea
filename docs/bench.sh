#!/usr/bin/env bash
# Regenerates docs/BENCHMARKS-avx512.md (Intel), docs/BENCHMARKS-avx512-amd.md (AMD Zen 4),
# docs/BENCHMARKS-avx512-zen5.md (AMD Zen 5) or, on a machine without AVX-512,
# docs/BENCHMARKS-avx2.md
# (not part of CI: it times things).
# Usage: [REUSE=1] docs/bench.sh [OUT_DIR]
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
  lut_throughput encode_throughput tree_encode_throughput quantized_encode_throughput nearest_throughput nearest2_throughput packed_throughput direct_throughput depthwise_throughput --test-threads=1 2>&1 \
  | sed -E 's/^test [^ ]+ \.\.\. //' | grep -vE '^(running|ok|Compiling|Finished|Running|$)|test result' \
  | grep -vE '^ +(Compiling|Finished|Running)' | tee -a "$out/kernels.txt"

# AVX2-only machines, emulated on this one: with CPUID faulting (`cpuid_fault` in /proc/cpuinfo),
# docs/cpuid_avx2.c makes the CPUIDs of the process and of the ONNX Runtime it starts report no
# AVX-512 (glibc's own, read before it, are capped by GLIBC_TUNABLES), so ONNX Runtime, the gemm
# crate and tabconv's kernels all dispatch to AVX2 code. Without
# it, only tabconv's kernels can be capped (TABCONV_SIMD), and ONNX Runtime keeps its best kernels.
# On a machine without AVX-512 every engine runs its AVX2 code already: no second run.
if ! grep -qw avx512f /proc/cpuinfo; then
  avx2_env=(); echo native > "$out/avx2_how"
elif grep -qw cpuid_fault /proc/cpuinfo && gcc -O2 -shared -fPIC -o "$out/cpuid_avx2.so" docs/cpuid_avx2.c; then
  avx2_env=(env LD_PRELOAD="$(cd "$out" && pwd)/cpuid_avx2.so"
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD)
  echo cpuid > "$out/avx2_how"
else
  avx2_env=(env TABCONV_SIMD=avx2); echo cap > "$out/avx2_how"
fi

models=(lenet5:mnist nin:mnist resnet18_fmnist:fmnist mobilenet_fmnist:fmnist)
[ -f "$PAPER/resnet18_mnist.onnx" ] && models+=(paper_resnet18:mnist)
for spec in "${models[@]}"; do
  m=${spec%%:*}; ds=${spec##*:}
  src="fixtures/models/$m.onnx"; [ "$m" = paper_resnet18 ] && src="$PAPER/resnet18_mnist.onnx"
  # the default pipeline, and every layer kept as lookups (argmin encoder); REUSE=1 keeps the
  # compiled models of an earlier run in OUT_DIR (to time again on a quieter machine)
  if [ "${REUSE:-0}" = 1 ] && [ -f "$out/$m.all_lut.tcv" ] && [ -f "$out/$m.default.tcv" ]; then :; else
  "$T/tabconv-compile" "$src" -o "$out/$m.default.tcv" --calib "fixtures/data/${ds}_calib.npy" \
    --report "$out/$m.default.json" 2>"$out/$m.default.log"
  "$T/tabconv-compile" "$src" -o "$out/$m.all_lut.tcv" --calib "fixtures/data/${ds}_calib.npy" \
    --set mask.min_logit_cosine=0 --set mask.max_expected_drop=null --set mask.restore_unprofitable=false --set mask.relearn=false \
    --report "$out/$m.all_lut.json" 2>"$out/$m.all_lut.log"
  fi
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
  # an AVX2-only machine: every engine of the run at AVX2 (see avx2_env above)
  [ ${#avx2_env[@]} -gt 0 ] && for b in 1 64; do
    "${avx2_env[@]}" "$T/tabconv" bench "$src" "$out/$m.default.tcv" --batch $b --threads 1 --seconds 2 \
      --no-tract --json > "$out/$m.avx2.b$b.json"
  done
done
# one file per kind of machine, so that a run on one does not replace another's: AVX-512 on
# Intel, AVX-512 on AMD Zen 4 (512-bit instructions as two 256-bit halves), on Zen 5 (CPU
# family 26: full-width 512-bit units), AVX2 only
doc=docs/BENCHMARKS-avx512.md
if grep -qw AuthenticAMD /proc/cpuinfo; then
  doc=docs/BENCHMARKS-avx512-amd.md
  family=$(grep -m1 '^cpu family' /proc/cpuinfo | grep -oE '[0-9]+$')
  [ "${family:-0}" -ge 26 ] && doc=docs/BENCHMARKS-avx512-zen5.md
fi
grep -qw avx512f /proc/cpuinfo || doc=docs/BENCHMARKS-avx2.md
python3 docs/bench_table.py "$out" "${models[@]}" > "$doc"
cat "$doc"
