"""Generated protobuf/gRPC modules for pdserve.proto.

The stubs are generated from the .proto by grpcio-tools the first time they are imported after the
.proto changed (its hash is stamped into the generated file), so code and API cannot drift.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).parent
_PROTO = _HERE / "pdserve.proto"


def _generate(out_dir: Path) -> None:
    # protoc runs in a child process: grpc_tools' native module and NIXL's bundled protobuf/gRPC
    # libraries crash when both are loaded into one process (seen with grpcio-tools 1.85, nixl 1.5)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{_HERE}", f"--python_out={out_dir}",
           f"--grpc_python_out={out_dir}", str(_PROTO)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed on {_PROTO} (exit {r.returncode}): {r.stderr.strip()}")


def _load():
    digest = hashlib.sha256(_PROTO.read_bytes()).hexdigest()[:16]
    out_dir = _HERE / "_gen"
    stamp = out_dir / "STAMP"
    if not (stamp.exists() and stamp.read_text() == digest):
        tmp = _HERE / f"_gen.tmp{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        _generate(tmp)
        (tmp / "STAMP").write_text(digest)
        if out_dir.exists():
            for f in out_dir.iterdir():
                f.unlink()
            out_dir.rmdir()
        try:
            tmp.rename(out_dir)
        except OSError:  # another process won the race with the same content
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    sys.path.insert(0, str(out_dir))  # the generated _grpc module imports `pdserve_pb2` by its bare name
    try:
        return importlib.import_module("pdserve_pb2"), importlib.import_module("pdserve_pb2_grpc")
    finally:
        sys.path.remove(str(out_dir))


pb, rpc = _load()
