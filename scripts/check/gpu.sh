#!/usr/bin/env bash
# The CUDA checks no CPU machine can run, as one script for a lent GPU machine with PyTorch 2.11.0
# and no Rust. Build here first and carry the binaries (about 60 MB) in gpu-bin/:
#   cargo build --release -p unclip-cli --bin train-clip && cargo build --release -p unclip-decoder --example bench_decoder
#   cargo test -p unclip-dist --test nccl --no-run   # prints the test binary's path
#   mkdir -p gpu-bin && cp target/release/train-clip target/release/examples/bench_decoder gpu-bin/ && cp <nccl test binary> gpu-bin/nccl
# then on the GPU machine, from the repository root: bash scripts/check/gpu.sh [OUT_DIR]
# Checks: NCCL collectives on the GPU; train-clip on CUDA in fp32, bf16, fp16 (loss scaling) and
# bf16 + channels-last, loss falling in each; the decoder benchmark in bf16 with MFU (needs diffusers).
set -uo pipefail
BIN=${BIN:-gpu-bin}
# DEVICE=cpu STEPS=100 BATCH=64 BIN=target/release runs the training checks here (VARIANTS=fp16,... picks
# some), to test this script.
DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-100} BATCH=${BATCH:-256}
OUT=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
step() { echo; echo "== $*"; }
check() { if "$@"; then echo "ok: $*"; else echo "FAILED ($?): $*"; status=1; fi; }

step "GPU"
nvidia-smi -L || status=1

if [ -x "$BIN/nccl" ]; then
  step "NCCL collectives on one GPU (world size 1)"
  check "$BIN/nccl" --exact nccl_collectives_on_one_gpu --include-ignored --nocapture
fi

if [ -x "$BIN/train-clip" ]; then
  IFS=, read -ra variants <<<"${VARIANTS:-fp32,bf16,fp16,bf16 channels_last}"
  for variant in "${variants[@]}"; do
    set -- $variant
    flags=(--set "device=$DEVICE" --set "train.steps=$STEPS" --set "train.batch_size=$BATCH" --set eval.every=50
           --set logging.every=25 --set logging.progress=lines --set "train.precision=$1")
    [ $# -gt 1 ] && flags+=(--set train.channels_last=true)
    step "train-clip on $DEVICE: $variant"
    "$BIN/train-clip" --config configs/shapes/clip.yaml --run-dir "$OUT/clip-${variant// /-}" "${flags[@]}" \
      2>&1 | tee "$OUT/clip-${variant// /-}.log"
    losses=$(grep -oE '^step [0-9]+/[0-9]+ loss [0-9.]+' "$OUT/clip-${variant// /-}.log" | cut -d' ' -f4)
    first=$(head -1 <<<"$losses") last=$(tail -1 <<<"$losses")
    check python3 -c "import sys; f, l = float('${first:-nan}'), float('${last:-nan}'); print('loss', f, '->', l); sys.exit(0 if l < 0.5 * f else 1)"
  done
fi

if [ -x "$BIN/bench_decoder" ] && python3 -c 'import diffusers' 2>/dev/null; then
  step "decoder training step, bf16, against diffusers (paper-like widths at 64 px)"
  UNCLIP_PYTHON=python3 UNCLIP_BENCH_PRECISION=bf16 UNCLIP_BENCH_ROUNDS=3 \
    check "$BIN/bench_decoder" 192,384,576,768 3 64 768 77 64 64 20
fi
echo; [ $status -eq 0 ] && echo "gpu checks: all passed" || echo "gpu checks: some FAILED"
exit $status
