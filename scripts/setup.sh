#!/usr/bin/env bash
# Takes a fresh Debian machine (root, with a Rust toolchain and python3) to one where `cargo build`
# and `cargo test` work: Debian packages, a cached Python venv holding libtorch (torch==2.11.0 from
# PyPI, the version tch 0.24.0 binds), and cargo wired to it with an rpath so binaries run as built.
# Idempotent: a second run checks stamps and returns in seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${UNCLIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unclip}
REQS="$ROOT/scripts/requirements.txt"
# The venv lives outside the clone so every clone shares it; a stamp of the requirements' hash
# says whether it is current, and a changed file only installs what is new.
REQS_HASH=$(sha256sum "$REQS" | cut -d' ' -f1)
VENV="$CACHE/venv-torch-2.11.0"
APT_PACKAGES=(libgloo-dev pkg-config curl)

say() { printf 'setup: %s\n' "$*"; }

# 1. Debian packages (gloo headers for the c10d shim of distributed training; curl streams
#    http(s):// shards).
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "Debian packages present (${APT_PACKAGES[*]})"
fi

# 2. The Python venv with torch and the fixture/reference packages.
if [ "$(cat "$VENV/.requirements-sha256" 2>/dev/null)" = "$REQS_HASH" ]; then
  say "venv up to date: $VENV"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV (downloads torch 2.11.0 and its CUDA libraries, a few GB)"
    mkdir -p "$CACHE"
    python3 -m venv "$VENV" 2>/dev/null || venv_failed=1
  fi
  if [ -n "${venv_failed:-}" ]; then
    say "python3 -m venv failed; installing python3-venv"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"; python3 -m venv "$VENV"
  fi
  say "installing $REQS into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
  echo "$REQS_HASH" >"$VENV/.requirements-sha256"
fi
TORCH_DIR=$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
TORCH_VERSION=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
[ "$TORCH_VERSION" = "2.11.0" ] || { echo "setup: expected torch 2.11.0 in $VENV, found $TORCH_VERSION" >&2; exit 1; }
ln -sfn "$VENV" "$ROOT/.venv"
# CLIP's BPE merges ship with open_clip_torch; they are compiled into the binaries (unclip-data).
CLIP_BPE=$("$VENV/bin/python" -c 'import os, open_clip; print(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"))')
[ -f "$CLIP_BPE" ] || { echo "setup: CLIP BPE merges not found at $CLIP_BPE" >&2; exit 1; }

# 3. Wire cargo to that libtorch. This file is machine-specific and git-ignored.
# The rpath lets built binaries and tests find libtorch with no LD_LIBRARY_PATH. libtorch_cuda.so,
# which the linker drops under --as-needed, is dlopen'ed at start-up by unclip_diffusion::device.
CONFIG="$ROOT/.cargo/config.toml"
want=$(cat <<TOML
# Written by scripts/setup.sh; machine-specific, do not commit.
[env]
LIBTORCH = "$TORCH_DIR"
LIBTORCH_CXX11_ABI = "1"
UNCLIP_PYTHON = "$VENV/bin/python"
UNCLIP_CLIP_BPE = "$CLIP_BPE"

[target.x86_64-unknown-linux-gnu]
rustflags = ["-C", "link-arg=-Wl,-rpath,$TORCH_DIR/lib"]

[target.aarch64-unknown-linux-gnu]
rustflags = ["-C", "link-arg=-Wl,-rpath,$TORCH_DIR/lib"]
TOML
)
if [ -f "$CONFIG" ] && [ "$(cat "$CONFIG")" = "$want" ]; then
  say "cargo already wired to $TORCH_DIR"
else
  mkdir -p "$ROOT/.cargo"
  printf '%s\n' "$want" >"$CONFIG"
  say "wrote $CONFIG (LIBTORCH=$TORCH_DIR)"
fi
say "done: torch $TORCH_VERSION, python $VENV/bin/python"
