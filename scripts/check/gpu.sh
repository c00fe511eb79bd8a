#!/usr/bin/env bash
# The CUDA checks no CPU machine can run, as one script for a lent GPU machine with PyTorch 2.11.0
# and no Rust. Build here first and carry the stripped binaries (about 45 MB) in gpu-bin/:
#   cargo build --release -p unclip-cli --bins
#   cargo build --release -p unclip-decoder --example bench_decoder -p unclip-prior --example bench_prior
#   cargo test --release -p unclip-dist --test nccl --no-run   # prints the test binary's path
#   mkdir -p gpu-bin && cp target/release/{train-clip,train-decoder,embed} target/release/examples/bench_{decoder,prior} gpu-bin/
#   cp <nccl test binary> gpu-bin/nccl && strip gpu-bin/*
# then on the GPU machine, from the repository root: bash scripts/check/gpu.sh [OUT_DIR]
# Checks (CHECKS picks some; default nccl,clip,bench): nccl: NCCL collectives on the GPU; clip:
# train-clip on CUDA in fp32, bf16, fp16 (loss scaling) and bf16 + channels-last, loss falling in
# each; bench: the decoder benchmark in bf16 with MFU (needs diffusers), plain and with activation
# checkpointing on both sides, whether CUDA too should
# take the sub-pixel upsampling convolutions, and the prior benchmark (fp32, DALLE2-pytorch's
# 12 × 768 prior); decoder: the shapes chain
# on CUDA — the shapes CLIP (700 steps), its embeddings, train-decoder in bf16 for DECODER_STEPS
# (10000) at batch DECODER_BATCH (the config's 32; more images per step answer sooner whether
# this UNet learns the shapes at all) with a grid of 64 held-out scenes (100 DDPM steps, guidance 1) every quarter, each
# printed with its shape count (`shapes: guidance 1 shape right N/119` in chain-decoder.log),
# with the shapes kept when the held-out images are denoised from t = 343 (SDEdit strength 0.35),
# then the final EMA grid in OUT/decoder-grid64.png. Logs and grids go to OUT_DIR, run
# directories (checkpoints) to RUNS.
set -uo pipefail
BIN=${BIN:-gpu-bin}
# DEVICE=cpu STEPS=100 BATCH=64 BIN=target/release runs the training checks here (VARIANTS=fp16,... picks
# some), to test this script.
DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-100} BATCH=${BATCH:-256}
OUT=${1:-${OUT:-runs/gpu-check}}
RUNS=${RUNS:-runs/gpu-check}
CHECKS=,${CHECKS:-nccl,clip,bench},
mkdir -p "$OUT" "$RUNS"
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0 skipped=
step() { echo; echo "== $*"; }
check() { if "$@"; then echo "ok: $*"; else echo "FAILED ($?): $*"; status=1; fi; }
# skip CHECK WHY: a requested check that cannot run, named in the summary
skip() { echo; echo "== $1: skipped, $2"; skipped+=" $1"; }
# wants CHECK BINARY...: CHECK was asked for and its binaries are in BIN (else says which are not)
wants() {
  local check=$1; shift
  [[ $CHECKS == *,$check,* ]] || return 1
  for b in "$@"; do
    [ -x "$BIN/$b" ] || { skip "$check" "no $BIN/$b"; return 1; }
  done
}
# the loss of a log's last "step N/M loss L" line must be under half its first one's
loss_halved() {
  losses=$(grep -oE '^step [0-9]+/[0-9]+ loss [0-9.]+' "$1" | cut -d' ' -f4)
  first=$(head -1 <<<"$losses") last=$(tail -1 <<<"$losses")
  python3 -c "import sys; f, l = float('${first:-nan}'), float('${last:-nan}'); print('loss', f, '->', l); sys.exit(0 if l < 0.5 * f else 1)"
}

if [ "$DEVICE" != cpu ]; then
  step "GPU"
  nvidia-smi -L || status=1
fi

if wants nccl nccl; then
  step "NCCL collectives on one GPU (world size 1)"
  check "$BIN/nccl" --exact nccl_collectives_on_one_gpu --include-ignored --nocapture
fi

if wants clip train-clip; then
  IFS=, read -ra variants <<<"${VARIANTS:-fp32,bf16,fp16,bf16 channels_last}"
  for variant in "${variants[@]}"; do
    set -- $variant
    flags=(--set "device=$DEVICE" --set "train.steps=$STEPS" --set "train.batch_size=$BATCH" --set eval.every=50
           --set logging.every=25 --set logging.progress=lines --set "train.precision=$1")
    [ $# -gt 1 ] && flags+=(--set train.channels_last=true)
    step "train-clip on $DEVICE: $variant"
    rm -rf "$RUNS/clip-${variant// /-}"   # always a fresh run (a rerun would be refused otherwise)
    "$BIN/train-clip" --config configs/shapes/clip.yaml --run-dir "$RUNS/clip-${variant// /-}" "${flags[@]}" \
      2>&1 | tee "$OUT/clip-${variant// /-}.log"
    check loss_halved "$OUT/clip-${variant// /-}.log"
  done
fi

if wants bench bench_decoder; then
  if python3 -c 'import diffusers' 2>/dev/null; then
    step "decoder training step, bf16, against diffusers (paper-like widths at 64 px)"
    UNCLIP_PYTHON=python3 UNCLIP_BENCH_PRECISION=bf16 UNCLIP_BENCH_ROUNDS=6 \
      check "$BIN/bench_decoder" 192,384,576,768 3 64 768 77 64 64 10
    step "the same, both sides with activation checkpointing (decoder.gradient_checkpointing; diffusers' enable_gradient_checkpointing)"
    UNCLIP_PYTHON=python3 UNCLIP_BENCH_PRECISION=bf16 UNCLIP_BENCH_ROUNDS=3 UNCLIP_BENCH_CHECKPOINTING=1 \
      check "$BIN/bench_decoder" 192,384,576,768 3 64 768 77 64 64 10
    step "the upsampling convolutions as sub-pixel convolutions on CUDA (bf16; CPU takes that path, CUDA not yet)"
    check python3 scripts/bench/decoder_alternatives.py subpixel cuda
    if [ -x "$BIN/bench_prior" ]; then
      step "prior training step, fp32, against diffusers' PriorTransformer (12 layers × 768, 77 tokens, batch 256)"
      UNCLIP_PYTHON=python3 UNCLIP_BENCH_ROUNDS=6 check "$BIN/bench_prior" 12 64 12 768 77 256 4
    else
      skip prior-bench "no $BIN/bench_prior"
    fi
  else
    skip bench "no diffusers for python3"
  fi
fi
# With --resume auto a rerun (after the lent machine's per-command limit, say) continues the runs;
# their logs are appended in RUNS, so the loss check sees the whole run.
if wants decoder train-clip embed train-decoder; then
  DECODER_STEPS=${DECODER_STEPS:-10000} DECODER_BATCH=${DECODER_BATCH:-32} CLIP_STEPS=${CLIP_STEPS:-700}
  quarter=$(( DECODER_STEPS >= 4 ? DECODER_STEPS / 4 : 1 )) log_every=$(( DECODER_STEPS >= 20 ? DECODER_STEPS / 20 : 1 ))
  step "the shapes chain on $DEVICE: CLIP ($CLIP_STEPS steps), embeddings, decoder ($DECODER_STEPS steps of $DECODER_BATCH, bf16)"
  "$BIN/train-clip" --config configs/shapes/clip.yaml --run-dir "$RUNS/chain-clip" --resume auto --set "device=$DEVICE" \
    --set "train.steps=$CLIP_STEPS" --set logging.progress=lines 2>&1 | tee -a "$RUNS/chain-clip.log"
  check loss_halved "$RUNS/chain-clip.log"
  for shards in 'clip64-{000000..000019}' 'clipval64-{000000..000001}'; do
    check "$BIN/embed" --clip "$RUNS/chain-clip" --token-features --device "$DEVICE" \
      --shards "data/shapes/$shards.tar" --out "$RUNS/chain-emb64"
  done
  decoder=(--config configs/shapes/decoder.yaml --run-dir "$RUNS/chain-decoder" --set "device=$DEVICE"
           --set "clip=$RUNS/chain-clip" --set "data.embedding_dir=$RUNS/chain-emb64" --set samples.count=64
           --set 'samples.guidance_scales=[1.0]' --set 'decoder.sampling={sampler: ddpm, steps: "100", clip: {static: 1.0}}'
           --set 'samples.denoise_strengths=[0.35]')
  "$BIN/train-decoder" "${decoder[@]}" --resume auto --set "train.steps=$DECODER_STEPS" --set "train.batch_size=$DECODER_BATCH" \
    --set "logging.images_every=$quarter" --set "checkpoint.every=$quarter" --set "logging.every=$log_every" --set logging.progress=lines 2>&1 | tee -a "$RUNS/chain-decoder.log"
  check loss_halved "$RUNS/chain-decoder.log"
  cp "$RUNS"/chain-{clip,decoder}.log "$RUNS"/chain-decoder/samples/*.png "$OUT"/ 2>/dev/null
  check "$BIN/train-decoder" "${decoder[@]}" --grid "$OUT/decoder-grid64.png"
fi
echo; [ $status -eq 0 ] && echo "gpu checks: all passed${skipped:+ (skipped:$skipped)}" || echo "gpu checks: some FAILED"
exit $status
