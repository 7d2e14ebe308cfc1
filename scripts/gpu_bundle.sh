#!/usr/bin/env bash
# Builds .gpu/bundle/: what the GPU machine (x86_64, CPython 3.12, torch 2.11+cu130, no network)
# lacks to run the whole pdserve cluster, small enough to travel with the repo (the device tool's
# 64 MiB limit for tree + carried folders). Run here, on the CPU box, from anywhere:
#   scripts/gpu_bundle.sh            build (idempotent; downloads are cached, see CACHE)
#   scripts/gpu_bundle.sh --check    build, then install into a scratch dir with a local python3.12
#                                    (if one exists) and smoke-test Ray, NIXL and grpc_tools there
# On the GPU machine: `source scripts/gpu_install.sh || exit 1` (see that script and docs/gpu.md).
#
# .gpu/ holds only what travels:
#   .gpu/bundle/*.whl                     plain wheels, installed with pip --target
#   .gpu/bundle/fallback/*.whl            grpcio + protobuf as used on the CPU box; installed there only
#                                         if the image's own are too old for grpcio-tools (see gpu_install.sh)
#   .gpu/bundle/<name>-<ver>-slim.tar.xz  Ray and NIXL wheels unpacked and cut down (too big as wheels)
#   .gpu/bundle/MANIFEST                  versions and sizes; gpu_install.sh reads the grpc pins from it
#   .gpu/tools/py_spy-*.whl              py-spy, for scripts/gpu_checks.sh benchhigh's PYSPY=1 (2.9 MB)
#   .gpu/models/llama-3-8b/               config.json + tokenizer for `model.load_format: dummy` (3.4 MB)
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- pins: the one place to change versions ------------------------------------------------------
PYVER=3.12
NIXL_VERSION=1.5.1              # nixl-cu13 (slimmed tarball) + the thin `nixl` meta package (wheel)
RAY_VERSION=2.60.0              # slimmed tarball
GRPC_TOOLS_VERSION=1.85.1       # grpcio-tools, grpcio-health-checking, grpcio-reflection
GRPCIO_VERSION=1.85.3           # fallback only (what the CPU box's .venv runs with these tools)
PYSPY_VERSION=0.4.3             # .gpu/tools: sampling profiler for benchhigh's PYSPY=1 (a static binary in a wheel)
PROTOBUF_VERSION=7.36.2         # fallback only (idem; grpcio-tools 1.85 needs protobuf >=7.35.1,<8)
PLAIN_WHEELS=(
  "nixl==$NIXL_VERSION"                       # makes `import nixl._api` pick nixl_cu13 (our first candidate)
  "grpcio-tools==$GRPC_TOOLS_VERSION"
  "grpcio-health-checking==$GRPC_TOOLS_VERSION"
  "grpcio-reflection==$GRPC_TOOLS_VERSION"
  "gguf==0.19.0"                              # pdserve dependency (engine/loader.py)
  "jsonschema==4.26.0"                        # Ray's install requirement (and tests/unit/test_helm.py)
  "jsonschema-specifications==2025.9.1"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
)
# the router's HTTP front door and metrics, and OpenTelemetry tracing with its OTLP/gRPC exporter (all pure
# Python; the exporter runs on the grpcio/protobuf settled above), at the versions CI runs with
for name in prometheus_client starlette uvicorn h11 click anyio sniffio \
            opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
            opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common \
            opentelemetry-exporter-otlp-common googleapis-common-protos; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "gpu_bundle: $name is not pinned in constraints.txt" >&2; exit 1; }
  PLAIN_WHEELS+=("$pin")
done
FALLBACK_WHEELS=("grpcio==$GRPCIO_VERSION" "protobuf==$PROTOBUF_VERSION")
SLIM_RECIPE=2                   # bump when the slimming below changes, to rebuild the cached tarballs
LIMIT_MB=50
# ---------------------------------------------------------------------------------------------------

CACHE=${PDSERVE_GPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pdserve/gpu-bundle}
OUT=.gpu/bundle
HOSTPY=${PYTHON:-python3}       # any local python with pip; it only downloads and unpacks here
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64
           manylinux_2_35_x86_64)
mkdir -p "$CACHE/wheels" "$CACHE/slim"

fetch() {  # fetch DIR SPEC...: cp312 manylinux x86_64 wheels, no deps; pip reuses files already in DIR
  local dir=$1; shift
  local plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  "$HOSTPY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${plat[@]}" -d "$dir" "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

wheel_of() {  # wheel_of NAME VERSION: the cached wheel's path (name normalized as in wheel filenames)
  local n; n=$(echo "$1" | tr '.-' '__')
  ls "$CACHE/wheels/${n}-${2}-"*.whl 2>/dev/null | head -1
}

slim_nixl() {  # slim_nixl STAGE: cut an unpacked nixl-cu13 wheel down to the UCX/POSIX agent
  local s=$1
  rm -rf "$s"/nixl_ep_cu13 "$s"/nixl_cu13.scripts "$s"/nixl_cu13-*.data \
         "$s"/nixl_cu13.libs/ucx/libucx_perftest*
  # plugins: keep UCX (what kv_transfer uses) and POSIX; drop the rest, telemetry/trace exporters too
  find "$s"/nixl_cu13.libs/nixl "$s"/.nixl_cu13.mesonpy.libs/plugins -name '*.so' \
       ! -name 'libplugin_UCX.so' ! -name 'libplugin_POSIX.so' -delete
  # then drop every bundled library that nothing kept needs (AWS/Azure/s2n/curl/gusli/...):
  # roots = Python extensions, the NIXL libraries, the kept plugins, all UCX transport modules
  "$HOSTPY" - "$s" <<'EOF'
import os, subprocess, sys
root = sys.argv[1]
mes, libs = f"{root}/.nixl_cu13.mesonpy.libs", f"{root}/nixl_cu13.libs"
def sofiles(d):
    return [os.path.join(d, f) for f in os.listdir(d) if ".so" in f and os.path.isfile(os.path.join(d, f))]
pool = {os.path.basename(p): p for p in sofiles(mes) + sofiles(libs)}   # resolvable by NEEDED name
roots = (sofiles(f"{root}/nixl_cu13") + sofiles(f"{mes}/plugins") + sofiles(f"{libs}/nixl")
         + sofiles(f"{libs}/ucx") + [pool[n] for n in pool if n.startswith(("libnixl.so", "libnixl_capi"))])
keep, todo = set(), list(roots)
while todo:
    p = todo.pop()
    out = subprocess.run(["readelf", "-d", p], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "(NEEDED)" in line:
            name = line.split("[", 1)[1].rstrip("]")
            if name in pool and pool[name] not in keep:
                keep.add(pool[name]); todo.append(pool[name])
dropped = 0
for name, p in pool.items():
    if p not in keep and p not in roots:
        dropped += os.path.getsize(p); os.remove(p)
print(f"  nixl: dropped {dropped / 2**20:.1f} MiB of libraries no kept module needs")
EOF
}

slim_ray() {  # slim_ray STAGE: drop the libraries and assets ray.init/actors/streaming do not load
  local s=$1
  rm -rf "$s"/ray/jars "$s"/ray/rllib "$s"/ray/tune "$s"/ray/train "$s"/ray/data "$s"/ray/serve \
         "$s"/ray/llm "$s"/ray/dashboard/client        # client = the web UI build; include_dashboard=False
}

build_slim() {  # build_slim NAME VERSION MODULE: cached <name>-<ver>-slim.tar.xz of the slimmed wheel
  local name=$1 ver=$2 mod=$3
  local tarball="$CACHE/slim/${name}-${ver}-slim${SLIM_RECIPE}.tar.xz"
  find "$CACHE/slim" -name "${name}-*-slim*.tar.xz" ! -name "$(basename "$tarball")" -delete  # stale recipes/versions
  if [ ! -s "$tarball" ]; then
    local whl; whl=$(wheel_of "$name" "$ver")
    local stage="$CACHE/slim/stage-$name"
    rm -rf "$stage"; mkdir -p "$stage"
    echo "  unpacking and slimming $(basename "$whl") ($(du -m "$whl" | cut -f1) MB)"
    "$HOSTPY" - "$whl" "$stage" <<'EOF'   # unzip, keeping the executable bits pip would keep
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        if not info.is_dir():
            os.chmod(path, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
EOF
    "slim_$mod" "$stage"
    verify_"$mod" "$stage"
    # top-level names only (no "./" entry, so unpacking leaves the target folder's own mode alone)
    (cd "$stage" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | sort |
       tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2000-01-01' -cf - -T - |
       xz -T0 -9 > "$tarball.tmp") && mv "$tarball.tmp" "$tarball"
    rm -rf "$stage"
  fi
  cp "$tarball" "$OUT/${name}-${ver}-slim.tar.xz"
}

need() {  # need STAGE PATH...: fail unless each path exists in the stage
  local s=$1; shift
  for p in "$@"; do
    compgen -G "$s/$p" >/dev/null || { echo "gpu_bundle: slimmed tree lacks $p" >&2; return 1; }
  done
}

verify_nixl() {
  local s=$1
  need "$s" 'nixl_cu13/_api.py' 'nixl_cu13/_bindings.cpython-312-x86_64-linux-gnu.so' \
    'nixl_cu13/_utils.cpython-312-x86_64-linux-gnu.so' '.nixl_cu13.mesonpy.libs/libnixl.so' \
    '.nixl_cu13.mesonpy.libs/plugins/libplugin_UCX.so' '.nixl_cu13.mesonpy.libs/plugins/libplugin_POSIX.so' \
    'nixl_cu13.libs/libucp-*.so*' 'nixl_cu13.libs/ucx/libuct_cma.so*' 'nixl_cu13.libs/ucx/libuct_cuda.so*' \
    'nixl_cu13-*.dist-info/METADATA'
  # every NEEDED name of every kept ELF file must be bundled or be a system/driver library
  local missing
  missing=$(find "$s" -type f \( -name '*.so' -o -name '*.so.*' \) -exec readelf -d {} + 2>/dev/null |
    grep -oP '\(NEEDED\).*\[\K[^]]+' | sort -u | while read -r lib; do
      [ -n "$(find "$s" -name "$lib" -print -quit)" ] ||
        case "$lib" in
          libc.so.*|libm.so.*|libdl.so.*|librt.so.*|libpthread.so.*|ld-linux*|libstdc++.so.*|libgcc_s.so.*|libgomp.so.*) ;;
          libssl.so.3|libcrypto.so.3|libz.so.1) ;;   # the wheel itself expects these from the system
          libcuda.so.*|libcudart.so.*|libnvidia-ml.so.*|libefa.so.*|libflexio.so*) ;;  # driver/CUDA/IB: theirs
          *) echo "$lib" ;;
        esac
    done)
  [ -z "$missing" ] || { echo "gpu_bundle: nixl libraries needed but not bundled: $missing" >&2; return 1; }
}

verify_ray() {
  local s=$1
  need "$s" 'ray/__init__.py' 'ray/_raylet.so' 'ray/core/src/ray/gcs/gcs_server' 'ray/core/src/ray/raylet/raylet' \
    'ray/core/libjemalloc.so' 'ray/core/generated/gcs_pb2.py' 'ray/_private/worker.py' 'ray/_private/node.py' \
    'ray/_private/services.py' 'ray/_private/workers/default_worker.py' 'ray/_private/log_monitor.py' \
    'ray/_private/runtime_env/agent/main.py' 'ray/_private/runtime_env/agent/thirdparty_files/aiohttp' \
    'ray/dashboard/agent.py' 'ray/dashboard/dashboard.py' 'ray/dashboard/modules/reporter' \
    'ray/util/__init__.py' 'ray/util/state' 'ray/autoscaler' 'ray/thirdparty_files/psutil' 'ray/cloudpickle' \
    'ray-*.dist-info/METADATA'
  for x in ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet; do
    [ -x "$s/$x" ] || { echo "gpu_bundle: $x is not executable" >&2; return 1; }
  done
  # nothing left may import a removed package at module level (lazy imports inside functions are fine)
  local hits
  hits=$(grep -rlE '^(import|from) ray\.(rllib|tune|train|data|serve|llm)\b' "$s/ray" --include='*.py' || true)
  [ -z "$hits" ] || echo "gpu_bundle: note: modules importing removed packages (must stay unused): $(echo "$hits" | sed "s|$s/||" | head -20 | tr '\n' ' ')"
}

echo "gpu_bundle: downloading into $CACHE/wheels"
fetch "$CACHE/wheels" "${PLAIN_WHEELS[@]}" "${FALLBACK_WHEELS[@]}" \
  "nixl-cu13==$NIXL_VERSION" "ray==$RAY_VERSION" "py-spy==$PYSPY_VERSION"
rm -rf .gpu/tools && mkdir -p .gpu/tools && cp "$(wheel_of py_spy "$PYSPY_VERSION")" .gpu/tools/

rm -rf .gpu/bundle; mkdir -p "$OUT/fallback"
spec_wheel() { local n=${1%%==*} v=${1##*==}; wheel_of "$n" "$v"; }
for spec in "${PLAIN_WHEELS[@]}"; do cp "$(spec_wheel "$spec")" "$OUT/"; done
for spec in "${FALLBACK_WHEELS[@]}"; do cp "$(spec_wheel "$spec")" "$OUT/fallback/"; done
echo "gpu_bundle: slimmed tarballs (cached in $CACHE/slim)"
build_slim nixl_cu13 "$NIXL_VERSION" nixl
build_slim ray "$RAY_VERSION" ray

{
  echo "# pdserve GPU bundle; built by scripts/gpu_bundle.sh; installed by scripts/gpu_install.sh"
  echo "python=$PYVER"
  echo "grpc_tools=$GRPC_TOOLS_VERSION"
  echo "grpcio_fallback=$GRPCIO_VERSION"
  echo "protobuf_fallback=$PROTOBUF_VERSION"
  echo "nixl=$NIXL_VERSION"
  echo "ray=$RAY_VERSION"
  (cd "$OUT" && find . -type f ! -name MANIFEST -printf '%P %s\n' | sort)
} > "$OUT/MANIFEST"

# Llama-3-8B shapes for `model.load_format: dummy` (config.json + the embedded tokenizer; no weights)
rm -rf .gpu/models
"${VENV_PY:-.venv/bin/python}" -P benchmarks/dummy_model.py .gpu/models/llama-3-8b >/dev/null

if ! grep -qxF '/.gpu/' .gitignore 2>/dev/null; then
  [ ! -s .gitignore ] || [ -z "$(tail -c1 .gitignore)" ] || echo >> .gitignore
  echo '/.gpu/' >> .gitignore
fi
total=$(du -cb "$OUT" | tail -1 | cut -f1)
(cd "$OUT" && ls -l --block-size=K -R . | grep -v '^total')
printf 'gpu_bundle: %s holds %.1f MB (%d bytes; limit %d MB)\n' "$OUT" "$(awk -v t="$total" 'BEGIN { print t / 1e6 }')" "$total" "$LIMIT_MB"
if [ "$total" -gt $((LIMIT_MB * 1000000)) ]; then
  echo "gpu_bundle: FAIL: over ${LIMIT_MB} MB; slim more (see slim_ray / slim_nixl)" >&2
  exit 1
fi

if [ "${1:-}" = "--check" ]; then
  # A local CPython 3.12 (pyenv's, say) stands in for the GPU machine's: a venv with the image's
  # packages that matter here, then gpu_install.sh into a scratch site, then Ray + NIXL + protoc.
  PY312=${PY312:-}
  if [ -z "$PY312" ]; then
    for c in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
      [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$c; break; }
    done
  fi
  if [ -z "$PY312" ]; then
    echo "gpu_bundle: --check skipped: no python3.12 here (static checks above passed)"; exit 0
  fi
  echo "gpu_bundle: --check with $PY312"
  venv="$CACHE/check-venv"
  [ -x "$venv/bin/python" ] || "$PY312" -m venv "$venv"
  # stand-ins for the image's own packages (KINDS.md's list); protobuf/grpcio left at what pip picks
  "$venv/bin/python" -m pip install -q --disable-pip-version-check grpcio protobuf msgpack pyyaml numpy \
    requests packaging click filelock aiohttp psutil prometheus-client attrs tqdm typing-extensions setuptools \
    2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  export PDSERVE_SITE=/tmp/pdserve-gpu-check-site PDSERVE_PYTHON="$venv/bin/python"
  rm -rf "$PDSERVE_SITE"
  bash scripts/gpu_install.sh
  PYTHONPATH=$PDSERVE_SITE timeout 300 "$venv/bin/python" - <<'EOF'
import time
import ray
@ray.remote
class Echo:
    def hi(self, x):
        return x + 1
    def stream(self, n):
        for i in range(n):
            yield i
t = time.time()
ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="gpucheck",
         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})  # workers inherit PYTHONPATH
a = Echo.options(name="echo").remote()
assert ray.get(a.hi.remote(1)) == 2
from ray.util import list_named_actors
assert "echo" in list_named_actors(), list_named_actors()
b = ray.get_actor("echo", namespace="gpucheck")
assert [ray.get(r) for r in b.stream.options(num_returns="streaming").remote(3)] == [0, 1, 2]
ray.kill(a)
ray.shutdown()
print(f"check: ray {ray.__version__}: init, actor, named actor, streaming generator OK ({time.time() - t:.1f} s)")
EOF
  PYTHONPATH=$PDSERVE_SITE timeout 120 "$venv/bin/python" - <<'EOF'
import time
import numpy as np
import nixl._api as api   # the meta package picks nixl_cu13 (no torch in this venv: first backend found)
b = api.nixlBind
def agent(name):           # as kv_transfer/transport.py builds it
    c = b.nixlAgentConfig(); c.useProgThread = True; c.useListenThread = False; c.pthrDelay = 1000
    c.syncMode = b.NIXL_THREAD_SYNC_NONE
    a = b.nixlAgent(name, c); assert {"UCX", "POSIX"} <= set(a.getAvailPlugins()), a.getAvailPlugins()
    a.createBackend("UCX", {}); return a
src, dst = (np.arange(1 << 20) % 251).astype(np.uint8), np.zeros(1 << 20, dtype=np.uint8)
A, B = agent("A"), agent("B")
A.registerMem(b.nixlRegDList(b.DRAM_SEG, [(src.ctypes.data, src.nbytes, 0, "")]), [])
B.registerMem(b.nixlRegDList(b.DRAM_SEG, [(dst.ctypes.data, dst.nbytes, 0, "")]), [])
remote = B.loadRemoteMD(A.getLocalMD()); remote = remote.decode() if isinstance(remote, bytes) else remote
desc = lambda arr: b.nixlXferDList(b.DRAM_SEG, np.array([[arr.ctypes.data, arr.nbytes, 0]], dtype=np.uint64))
h = B.createXferReq(b.NIXL_READ, desc(dst), desc(src), remote, b"done", [])
st, t = B.postXferReq(h, b"done"), time.time()
while st == b.NIXL_IN_PROG and time.time() - t < 30:
    st = B.getXferStatus(h)
assert st == b.NIXL_SUCCESS and np.array_equal(src, dst), st
B.releaseXferReq(h)
print(f"check: nixl ({b.__name__}) plugins {sorted(A.getAvailPlugins())}: 1 MiB UCX READ between two agents OK")
EOF
  gen=$(mktemp -d)
  for proto in pdserve/proto/pdserve.proto proto/pdserve.proto; do [ -f "$proto" ] && break; done
  PYTHONPATH=$PDSERVE_SITE "$venv/bin/python" -m grpc_tools.protoc -I"$(dirname "$proto")" --python_out="$gen" \
    --grpc_python_out="$gen" "$proto"
  PYTHONPATH=$gen:$PDSERVE_SITE "$venv/bin/python" -c 'import grpc, pdserve_pb2, pdserve_pb2_grpc; print("check: protoc stubs import with grpcio", grpc.__version__)'
  rm -rf "$gen"
  echo "gpu_bundle: --check passed"
fi
