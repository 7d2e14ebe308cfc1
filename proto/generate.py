"""Writes the committed gRPC stubs of pdserve.proto beside it: `python proto/generate.py` (needs grpcio-tools).

The stubs are committed, so importing the API needs no protoc at run time and writes nothing into the
installed tree; tests/unit/test_packaging.py regenerates them into a scratch folder and fails if the committed
files differ, so the .proto and the code cannot drift.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = ("pdserve_pb2.py", "pdserve_pb2_grpc.py")


def generate(out: Path) -> dict[str, str]:
    """Generate the stubs into `out`; returns {file name: text}."""
    # the proto's import path is pdserve/proto/pdserve.proto, so the _grpc module imports its messages
    # as `from pdserve.proto import pdserve_pb2`, never by a bare top-level name.
    # protoc runs in a child process: grpc_tools' native module and NIXL's bundled protobuf/gRPC
    # libraries crash when both are loaded into one process (seen with grpcio-tools 1.85, nixl 1.5)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path=pdserve/proto={HERE}",
           f"--python_out={out}", f"--grpc_python_out={out}", "pdserve/proto/pdserve.proto"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed (exit {r.returncode}): {r.stderr.strip()}")
    return {name: (out / "pdserve" / "proto" / name).read_text() for name in STUBS}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (HERE / name).write_text(text)
            print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
