#!/usr/bin/env bash
# Resident memory of each rank of a 2-process CPU job over time: runs `torchrun --nproc-per-node 2
# --no-python BINARY ARGS...`, samples every rank's VmRSS every 0.2 s, and prints per rank the peak,
# and the lowest and highest resident memory from half to nine tenths of the run (steady steps:
# after the first step's set-up, before the final checkpoint and exit). glibc's retention of freed memory is turned off
# (UNCLIP_MALLOC_TUNING=0), so memory a step frees leaves the process and the samples show what is
# live. Used for the README's ZeRO-2 figures:
#   SETS="--set model.hidden=4096 --set model.depth=9 --set train.steps=12 --set train.batch_size=64 \
#         --set sampling=null --set logging.images_every=null --set distributed.shard_optimizer=true"
#   bash scripts/check/rank_memory.sh target/release/examples/train_toy --config configs/toy/toy2d.yaml \
#       $SETS --set distributed.shard_gradients=false --run-dir /tmp/zero1
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: $0 BINARY [ARGS...]" >&2; exit 2; }
binary=$1
samples=$(mktemp)
UNCLIP_MALLOC_TUNING=0 .venv/bin/torchrun --nproc-per-node 2 --no-python "$@" &
launcher=$!
start=$(date +%s.%N)
while kill -0 "$launcher" 2>/dev/null; do
  for pid in $(pgrep -f -- "^$binary " || true); do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    rank=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | awk -F= '$1 == "RANK" {print $2}' || true)
    if [ -n "$rss" ] && [ -n "$rank" ]; then
      echo "$(date +%s.%N) $rank $rss" >> "$samples"
    fi
  done
  sleep 0.2
done
wait "$launcher"
awk -v start="$start" '
  { t = $1 - start; n[$2]++; time[$2, n[$2]] = t; rss[$2, n[$2]] = $3; if (t > end) end = t }
  END {
    for (r = 0; r < 2; r++) {
      peak = 0; lo = -1; hi = 0
      for (i = 1; i <= n[r]; i++) {
        v = rss[r, i]
        if (v > peak) peak = v
        if (time[r, i] > end / 2 && time[r, i] < end * 0.9) { if (lo < 0 || v < lo) lo = v; if (v > hi) hi = v }
      }
      printf "rank %d: peak %d MB; steady steps %d-%d MB\n", r, peak / 1024, lo / 1024, hi / 1024
    }
  }' "$samples"
rm -f "$samples"
