#!/bin/sh
# Build the seed corpora of the fuzz targets (fuzz/corpus/<target>/, not committed) from the
# repository's fixtures. Run from anywhere; needs a built tabconv-compile for the .tcv seeds
# (target/release/tabconv-compile, built here if missing; TABCONV_COMPILE=path overrides it).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
fx="$root/fixtures"
c="$root/fuzz/corpus"
mkdir -p "$c/onnx_import" "$c/run" "$c/tcv_read" "$c/npy" "$c/idx" "$c/cifar" "$c/pipeline_yaml"

# ONNX models: the single-op conformance graphs, the model-zoo idioms and the small trained
# models (resnet18_fmnist, 2.8 MB, is left out: large inputs slow every mutation down).
for m in "$fx"/ops/*.onnx "$fx"/zoo/*.onnx "$fx"/models/lenet5.onnx "$fx"/models/nin.onnx \
         "$fx"/models/static_*.onnx "$fx"/models/lenet5_dynamo.onnx; do
    cp "$m" "$c/onnx_import/$(basename "$m")"
    cp "$m" "$c/run/$(basename "$m")"
done

# .npy: the small conformance inputs/outputs (several dtypes), labels, a gzipped one
for f in "$fx"/ops/*.npy "$fx"/zoo/*.out0.npy "$fx"/zoo/squeezenet_like.in0.npy "$fx"/expected/lenet5_ort.npy; do
    cp "$f" "$c/npy/$(basename "$f")"
done
head -c 4096 "$fx/data/mnist_test_labels.npy" > "$c/npy/labels_head.npy"
gzip -n -c "$fx/ops/conv_depthwise.in0.npy" > "$c/npy/conv_depthwise.in0.npy.gz"

# IDX: 3-D images, 4-D images, 1-D labels, each plain and gzipped (pixels: bytes of a fixture)
# pixels: the raw float bytes of a fixture after its 128-byte .npy header (no magic number in front)
pixels="$fx/data/mnist_test.npy"
{ printf '\000\000\010\003\000\000\000\004\000\000\000\034\000\000\000\034'; tail -c +129 "$pixels" | head -c 3136; } > "$c/idx/images3"
{ printf '\000\000\010\004\000\000\000\002\000\000\000\003\000\000\000\004\000\000\000\004'; tail -c +129 "$pixels" | head -c 96; } > "$c/idx/images4"
{ printf '\000\000\010\001\000\000\000\012'; printf '\000\001\002\003\004\005\006\007\010\011'; } > "$c/idx/labels1"
for f in images3 images4 labels1; do gzip -n -c "$c/idx/$f" > "$c/idx/$f.gz"; done

# CIFAR: first byte = how the target treats the rest (see fuzz/src/lib.rs `cifar`)
{ printf '\000'; tail -c +129 "$pixels" | head -c 6146; } > "$c/cifar/cifar10_two_records"
{ printf '\003'; tail -c +129 "$pixels" | head -c 6148; } > "$c/cifar/cifar100_two_records"
{ printf '\001'; tail -c +129 "$pixels" | head -c 3073; } > "$c/cifar/cifar10_as_train_bin"
{ printf '\200'; tail -c +129 "$pixels" | head -c 5000; } > "$c/cifar/not_whole_records"

# Pipelines: the shipped ones and variants setting every pass's options
cp "$root"/passes/*.yaml "$c/pipeline_yaml/"
cat > "$c/pipeline_yaml/quick_lut.yaml" <<'EOF'
name: quick
description: every pass, small settings
passes:
  - fold-batchnorm:
  - gemm-to-matmul:
  - conv-to-im2col:
      min_macs: 0
  - constant-fold:
  - lut:
      k: 16
      subspace: 0
      fc_subspace: 4
      encoder: tree
      refit: true
      ridge: 0.1
      refit_iters: 3
      tables: i8
      max_rows: 256
      kmeans_iters: 3
      progressive: true
      min_macs: 0
      keep_exact: ["y*"]
  - mask:
      min_logit_cosine: 0.9
      samples: 16
      relearn: true
      restore_unprofitable: false
      force_lut: ["conv*"]
      time_model: {encode_mac: 2.0, compare: 10.0, lookup: 1.0}
      lut: {k: 16, max_rows: 128, kmeans_iters: 2, refit: false, tables: f32, encoder: argmin}
  - im2col-to-conv:
  - channels-last:
  - dead-code:
EOF
cat > "$c/pipeline_yaml/accuracy.yaml" <<'EOF'
name: accuracy
passes:
  - gemm-to-matmul:
  - conv-to-im2col:
  - lut: {k: 256, fc_subspace: 2, encoder: argmin, refit: false, max_rows: 64, kmeans_iters: 2}
  - mask: {max_accuracy_drop: 0.5, relearn: false, samples: 8}
  - dead-code:
EOF
cat > "$c/pipeline_yaml/reduction.yaml" <<'EOF'
name: reduction
passes:
  - conv-to-im2col:
  - lut: {encoder: auto, refit: false, max_rows: 64, kmeans_iters: 2, progressive: false}
  - mask: {target_reduction: 0.3, relearn: false, keep_exact: []}
EOF

# .tcv: small compiled models with every ai.tabconv op (both encoders, i8 and f32 tables, K = 16
# and 256, channels-last): single-layer conformance graphs calibrated on their own inputs (a few
# KB each: small inputs mutate fast), and exact compiles of model-zoo idioms
compile=${TABCONV_COMPILE:-"$root/target/release/tabconv-compile"}
if [ ! -x "$compile" ]; then
    (cd "$root" && cargo build --release --bin tabconv-compile)
fi
quick="--set lut.max_rows=64 --set lut.kmeans_iters=2 --set lut.refit=false --set mask.relearn=false --set mask.restore_unprofitable=false --set mask.min_logit_cosine=0 --set mask.max_expected_drop=null"
t="$c/tcv_read"
for m in conv_valid conv_same_upper conv_1x1 view_flatten_gemm_opset13 gemm_symbolic_batch; do
    for v in "tree:--set lut.encoder=tree" "argmin_f32:--set lut.encoder=argmin --set lut.tables=f32" \
             "k256:--set lut.k=256 --set lut.encoder=argmin"; do
        # shellcheck disable=SC2086
        "$compile" "$fx/ops/$m.onnx" -o "$t/${m}_${v%%:*}.tcv" --calib "$fx/ops/$m.in0.npy" $quick ${v#*:} 2>/dev/null
    done
done
for m in "$fx"/models/static_legacy.onnx "$fx"/zoo/shufflenet_like.onnx "$fx"/zoo/squeezenet_like.onnx; do
    "$compile" "$m" -o "$t/$(basename "$m" .onnx)_exact.tcv" --pipeline exact 2>/dev/null
done
# argmin codebooks with norms (fitted in the output's metric: a third PQEncode input), which
# only layers past the stem get (the single-layer graphs above are all stems)
# shellcheck disable=SC2086
"$compile" "$fx/zoo/shufflenet_like.onnx" -o "$t/shufflenet_like_metric.tcv" --calib "$fx/zoo/shufflenet_like.in0.npy" \
    $quick --set lut.encoder=argmin --set lut.argmin_metric=output --set lut.learn=none 2>/dev/null
echo "seed corpora in $c:"
for d in "$c"/*; do echo "  $(basename "$d"): $(ls "$d" | wc -l) files"; done
