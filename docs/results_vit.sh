#!/usr/bin/env bash
# The "Beyond vision" section of docs/RESULTS.md (issue 12): the fixture ViTs (fixtures/vit.py)
# on MNIST and Fashion-MNIST and the MLP, compiled with the default pipeline, with
# `mask.max_accuracy_drop=0.5` (as the CNN rows above), the same without the speed-based restores,
# with 256 codes per codebook (and 2 values per codebook on token layers), and with every linear layer as lookups; evaluated on the full 10 000-image test sets; timed
# against ONNX Runtime (one thread, batch 1 and 64). Replaces everything from "## Beyond vision"
# on in docs/RESULTS.md. Needs the IDX files ($MNIST_DIR, $FMNIST_DIR, see docs/results.sh) and
# python3 with numpy and onnxruntime (bench's ORT column). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST_DIR=${MNIST_DIR:-/tmp/mnist/package/data}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
out=${OUT:-/tmp/tabconv-results-vit}
mkdir -p "$out"
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin tabconv --bin tabconv-compile
T=target/release

# validation sets: 2000 training images the calibration set (the first 1024) does not use
[ -f "$out/fmnist_val_labels.npy" ] || python3 docs/val_sets.py "$MNIST_DIR" "$FMNIST_DIR" "$out"

# variant name → extra --set flags
declare -A VARIANTS=(
  [default]=""
  [drop]="--set mask.max_accuracy_drop=0.5"
  [drop_all]="--set mask.max_accuracy_drop=0.5 --set mask.restore_unprofitable=false"
  [drop_all_s2]="--set mask.max_accuracy_drop=0.5 --set mask.restore_unprofitable=false --set lut.token_subspace=2"
  [drop_all_k256]="--set mask.max_accuracy_drop=0.5 --set mask.restore_unprofitable=false --set lut.k=256"
  [drop_all_k256_s2]="--set mask.max_accuracy_drop=0.5 --set mask.restore_unprofitable=false --set lut.k=256 --set lut.token_subspace=2"
  [all_lut]="--set mask.min_logit_cosine=0 --set mask.max_expected_drop=null --set mask.restore_unprofitable=false"
)
model_row() { # key model dataset_dir dataset
  local key=$1 model=$2 dir=$3 ds=$4
  local x y
  x=$(ls "$dir"/t10k-images-idx3-ubyte* | head -1)
  y=$(ls "$dir"/t10k-labels-idx1-ubyte* | head -1)
  "$T/tabconv" eval "$model" --json --batch 100 --inputs "$x" --labels "$y" > "$out/$key.exact.eval.json"
  for v in "${!VARIANTS[@]}"; do
    [ "$key" = mlp_mnist ] && [[ "$v" == drop_all_?* ]] && continue
    local start
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$T/tabconv-compile" "$model" -o "$out/$key.$v.tcv" --calib "fixtures/data/${ds}_calib.npy" \
      --val "$out/${ds}_val.npy" --val-labels "$out/${ds}_val_labels.npy" ${VARIANTS[$v]} \
      --report "$out/$key.$v.report.json" 2> "$out/$key.$v.compile.log"
    echo "$(date +%s.%N) - $start" | bc > "$out/$key.$v.compile_seconds"
    "$T/tabconv" eval "$out/$key.$v.tcv" --json --batch 100 --inputs "$x" --labels "$y" > "$out/$key.$v.eval.json"
  done
  for b in 1 64; do
    local k256=()
    for v in drop_all_k256 drop_all_k256_s2; do
      [ -f "$out/$key.$v.tcv" ] && k256+=("$out/$key.$v.tcv")
    done
    "$T/tabconv" bench "$model" "$out/$key.drop_all.tcv" "$out/$key.all_lut.tcv" "${k256[@]}" --batch $b --threads 1 \
      --seconds 3 --no-tract --json > "$out/$key.bench$b.json"
  done
}
model_row vit_mnist fixtures/models/vit_mnist.onnx "$MNIST_DIR" mnist
model_row vit_fmnist fixtures/models/vit_fmnist.onnx "$FMNIST_DIR" fmnist
model_row mlp_mnist fixtures/models/mlp_mnist.onnx "$MNIST_DIR" mnist
python3 - "$out" > "$out/section.md" <<'PY'
import sys
sys.path.insert(0, "docs")
import results_vit_table
results_vit_table.main(sys.argv[1])
PY
python3 - "$out/section.md" <<'PY'
import sys
section = open(sys.argv[1]).read()
text = open("docs/RESULTS.md").read()
i = text.find("## Beyond vision")
text = (text[:i] if i >= 0 else text.rstrip("\n") + "\n\n") + section
open("docs/RESULTS.md", "w").write(text)
PY
cat "$out/section.md"
