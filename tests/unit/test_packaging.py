"""Guards what the distribution installs: one top-level name, `pdserve`, holding every folder pyproject.toml maps.

The design card's folders (kernels/, engine/, router/, proto/, ...) sit at the top of the repository but must
install only as pdserve.<folder>: a top-level `kernels` once shadowed Hugging Face's package of that name and
broke CI. This builds the wheel and reads its file list, checks that the installed package exposes no bare
folder name, and that the committed gRPC stubs are what proto/pdserve.proto generates now (so they cannot
drift apart).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
BARE_NAMES = ("kernels", "engine", "router", "proto", "kv_transfer", "worker")


def _source_files() -> dict[str, Path]:
    """{path inside the wheel: source file} for every .py file under the folders the package-dir maps."""
    out = {}
    for pkg, folder in SETUPTOOLS["package-dir"].items():
        folder = ROOT / folder
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder)
            if not any(p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]):
                out[str(Path(*pkg.split("."), rel))] = f
    return out


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    # build from a copy: an in-tree build writes build/ and *.egg-info into the repository others work in
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for p in ROOT.iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy2(p, src / p.name)
    for folder in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout}\n{r.stderr}"
    (whl,) = out.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_installs_only_pdserve(wheel_names):
    top = {n.split("/")[0] for n in wheel_names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"pdserve"}, f"top-level entries of the wheel: {sorted(top)}"


def test_wheel_holds_every_mapped_folder(wheel_names):
    names = set(wheel_names)
    packages = {*SETUPTOOLS["packages"], *SETUPTOOLS["package-dir"]}
    missing = [f"package {p}" for p in sorted(packages) if f"{p.replace('.', '/')}/__init__.py" not in names]
    # a folder with .py files but missing from [tool.setuptools].packages silently drops out of the wheel
    missing += [f"{f.relative_to(ROOT)} (as {w})" for w, f in sorted(_source_files().items()) if w not in names]
    if "pdserve/proto/pdserve.proto" not in names:
        missing.append("pdserve/proto/pdserve.proto (package-data)")
    assert not missing, "not in the wheel:\n" + "\n".join(missing)


def test_no_bare_folder_name_is_importable():
    code = ("import importlib.util, json, sys\n"
            "def where(n):\n"
            "    s = importlib.util.find_spec(n)\n"
            "    return None if s is None else [s.origin, *(s.submodule_search_locations or [])]\n"
            "print(json.dumps({n: where(n) for n in sys.argv[1:]}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the install alone, not a dev's path
    r = subprocess.run([sys.executable, "-c", code, "pdserve.kernels", *BARE_NAMES], cwd=tempfile.gettempdir(),
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found.pop("pdserve.kernels"), "pdserve.kernels is not importable from a neutral folder: install the repo"
    # ours: the source folders mapped into pdserve (a venv inside the checkout may hold other packages of
    # these names, e.g. Hugging Face's `kernels`, which transformers imports: that is the point)
    ours = [(ROOT / folder).resolve() for folder in SETUPTOOLS["package-dir"].values()]
    inside = {n: paths for n, paths in found.items()
              if paths and any(p and any(Path(p).resolve().is_relative_to(o) for o in ours) for p in paths)}
    assert not inside, f"bare names that resolve into our source folders (import them as pdserve.<name>): {inside}"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools not installed (pip install pdserve[cluster]): cannot regenerate the stubs")
def test_committed_grpc_stubs_match_the_proto(tmp_path):
    from pdserve.proto.generate import generate

    stale = [name for name, text in generate(tmp_path).items() if (ROOT / "proto" / name).read_text() != text]
    assert not stale, f"proto/{', proto/'.join(stale)} differ from proto/pdserve.proto: run python proto/generate.py"
