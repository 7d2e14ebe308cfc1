# Installs .gpu/bundle (built on the CPU box by scripts/gpu_bundle.sh) on the GPU machine, offline,
# into /tmp/site, and checks the imports. Convention: from the repo root, SOURCE it, so that the
# PYTHONPATH it sets stays set in your shell:
#
#     source scripts/gpu_install.sh || exit 1
#
# (in a device `run`: carry [".gpu"] and start the command with that line; see docs/gpu.md).
# `bash scripts/gpu_install.sh` installs the same but cannot set your shell's PYTHONPATH: then follow it
# with `export PYTHONPATH=/tmp/site`. Knobs: PDSERVE_SITE (default /tmp/site), PDSERVE_PYTHON (python3).
# Takes a few seconds: pip installs the small wheels, tar unpacks the slimmed Ray and NIXL trees, and
# pip installs pdserve itself from this tree, editable, into python3's own environment, as
# scripts/setup.sh does on the CPU box (its package-dir mapping needs an install, and Ray's workers
# import the installed package; an editable install's finder is a .pth, which a PYTHONPATH folder
# would not run). PDSERVE_SELF_INSTALL=0 skips that step.
# The bundled grpcio/protobuf (bundle/fallback/) are installed only if the image's own do not satisfy
# grpcio-tools' requirements; otherwise the image's are used, with a warning if versions differ.

_pdserve_gpu_install() {
  local site=${PDSERVE_SITE:-/tmp/site} py=${PDSERVE_PYTHON:-python3} b=.gpu/bundle t0=$SECONDS
  if [ ! -f "$b/MANIFEST" ]; then
    echo "gpu_install: no $b/MANIFEST here ($(pwd)): run from the repo root, with .gpu carried" \
         "(built by scripts/gpu_bundle.sh on the CPU box)" >&2
    return 1
  fi
  mkdir -p "$site" || return 1

  # 1. grpcio/protobuf: does the image's pair (PYTHONPATH ignored) satisfy grpcio-tools' Requires-Dist?
  local tools_whl fallback
  tools_whl=$(ls "$b"/grpcio_tools-*.whl 2>/dev/null | head -1)
  fallback=$(env -u PYTHONPATH "$py" - "$tools_whl" <<'EOF'
import sys, zipfile
from importlib import metadata
from packaging.requirements import Requirement
from packaging.version import Version
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
reqs = [Requirement(l.split(":", 1)[1].strip()) for l in meta.splitlines() if l.startswith("Requires-Dist:")]
bad = []
for r in reqs:
    if r.name not in ("grpcio", "protobuf") or r.marker:
        continue
    try:
        have = metadata.version(r.name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or Version(have) not in r.specifier:
        bad.append(f"{r.name} {have or 'missing'} (grpcio-tools needs {r.specifier})")
print("; ".join(bad))
EOF
) || { echo "gpu_install: could not read the image's grpcio/protobuf versions with $py" >&2; return 1; }

  # 2. plain wheels (+ fallback grpcio/protobuf when needed), then the slimmed trees
  local wheels=("$b"/*.whl)
  if [ -n "$fallback" ]; then
    echo "gpu_install: WARNING: the image's $fallback; installing the bundled ones into $site:" \
         $(cd "$b/fallback" && ls *.whl)
    wheels+=("$b"/fallback/*.whl)
  fi
  local out rc t
  out=$("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" "${wheels[@]}" 2>&1); rc=$?
  [ -z "$out" ] || printf '%s\n' "$out" | grep -v "^WARNING: Target directory .* already exists"
  [ "$rc" -eq 0 ] || { echo "gpu_install: pip install failed" >&2; return 1; }
  for t in "$b"/*-slim.tar.xz; do
    tar -xJf "$t" -C "$site" || { echo "gpu_install: cannot unpack $t" >&2; return 1; }
  done

  if [ "${PDSERVE_SELF_INSTALL:-1}" = 1 ]; then   # pdserve itself: editable, into python3's environment
    out=$("$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
          --disable-pip-version-check -e . 2>&1); rc=$?
    [ -z "$out" ] || printf '%s\n' "$out"
    [ "$rc" -eq 0 ] || { echo "gpu_install: pip install -e . (pdserve, this tree) failed" >&2; return 1; }
  fi

  case ":${PYTHONPATH:-}:" in
    *":$site:"*) ;;
    *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac

  # 3. checks (NIXL in its own process: its bundled gRPC/protobuf and grpc_tools' native module
  #    must not share one, see proto/generate.py)
  local tools_ver cpu_grpcio
  tools_ver=$(sed -n 's/^grpc_tools=//p' "$b/MANIFEST")
  cpu_grpcio=$(sed -n 's/^grpcio_fallback=//p' "$b/MANIFEST")
  "$py" - "$tools_ver" "$cpu_grpcio" <<'EOF' || { echo "gpu_install: import check failed (PYTHONPATH=$PYTHONPATH)" >&2; return 1; }
import sys
from importlib import metadata
import ray, grpc, google.protobuf, grpc_tools, grpc_health.v1.health, grpc_reflection.v1alpha.reflection
import gguf, jsonschema, prometheus_client, starlette, uvicorn
import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # tracing.otlp_endpoint
import pdserve.proto   # the committed stubs check grpcio/protobuf against the versions that made them
v = lambda d: metadata.version(d)
print(f"gpu_install: ray {ray.__version__}, grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}, "
      f"grpcio-tools {v('grpcio-tools')}, grpcio-health-checking {v('grpcio-health-checking')}, "
      f"grpcio-reflection {v('grpcio-reflection')}, gguf {v('gguf')}, jsonschema {v('jsonschema')}")
print(f"gpu_install: pdserve {v('pdserve')} from {pdserve.__file__.rsplit('/', 1)[0]}")
from packaging.version import Version
if grpc.__version__ != sys.argv[1]:
    older = Version(grpc.__version__) < Version(sys.argv[1])
    print(f"gpu_install: WARNING: grpcio {grpc.__version__} ({grpc.__file__}) differs from grpcio-tools "
          f"{sys.argv[1]}: " + ("stubs generated by these tools refuse to import with an older grpcio"
          if older else f"a newer grpcio accepts their stubs (the CPU box pairs grpcio {sys.argv[2]} "
          f"with tools {sys.argv[1]})"))
    if older:
        sys.exit(1)
EOF
  "$py" -m grpc_tools.protoc --version >/dev/null || { echo "gpu_install: grpc_tools.protoc does not run" >&2; return 1; }
  "$py" - <<'EOF' || { echo "gpu_install: NIXL check failed" >&2; return 1; }
from importlib import metadata
import nixl_cu13._api as api
import nixl._api as meta   # what kv_transfer/transport.py imports first: the meta package -> nixl_cu13
b = api.nixlBind
cfg = b.nixlAgentConfig(); cfg.useProgThread = False; cfg.useListenThread = False
agent = b.nixlAgent("gpu_install_check", cfg)
plugins = sorted(agent.getAvailPlugins())
assert "UCX" in plugins, plugins
agent.createBackend("UCX", {})   # loads UCX and its transports, as kv_transfer/transport.py does
print(f"gpu_install: nixl-cu13 {metadata.version('nixl-cu13')} (nixl._api -> {meta.__name__}), plugins {plugins}")
EOF
  echo "gpu_install: OK in $((SECONDS - t0)) s; PYTHONPATH=$PYTHONPATH"
}

if (return 0 2>/dev/null); then   # sourced
  _pdserve_gpu_install || { unset -f _pdserve_gpu_install; return 1; }
  unset -f _pdserve_gpu_install
else
  _pdserve_gpu_install; exit $?
fi
