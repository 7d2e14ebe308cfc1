"""`pdserve profile`'s KV transfer measurement (pdserve/planner/measure.py): the exporter in a second process, as
a prefill worker is, with a real NIXL READ between two CPU processes here (the same code path a GPU takes, with
VRAM instead of DRAM); block placement and the byte check worked out by hand."""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch

from pdserve.planner import measure

pytest.importorskip("pdserve.kv_transfer")

LAYERS, BS, HEADS, DIM = 2, 16, 2, 8
RAW_BLOCK = LAYERS * 2 * BS * HEADS * DIM * 4  # float32: 4096 B
FP8_BLOCK = LAYERS * 2 * BS * HEADS * DIM + LAYERS * 2 * BS * HEADS * 4  # e4m3 codes + a float32 scale per head


def _engine(dtype=torch.float32):
    """What measure_transfer reads of an engine: its KV cache (geometry, dtype, device) and block size."""
    cache = torch.zeros(4, LAYERS, 2, BS, HEADS, DIM, dtype=dtype)
    return SimpleNamespace(runner=SimpleNamespace(kv_cache=cache), config=SimpleNamespace(block_size=BS))


def test_placement_ids():
    assert measure.placement_ids("adjacent", 3) == ([0, 1, 2], [3, 4, 5])
    assert measure.placement_ids("scattered", 3) == ([0, 2, 4], [5, 3, 1])
    with pytest.raises(ValueError, match="adjacent, scattered"):
        measure.placement_ids("random", 3)


def test_block_sums_see_every_byte_and_the_order():
    cache = torch.randn(3, LAYERS, 2, BS, HEADS, DIM)
    sums = measure._block_sums(cache, [0, 1])
    assert sums == measure._block_sums(cache.clone(), [0, 1])
    assert sums != measure._block_sums(cache, [1, 0])  # blocks swapped
    other = cache.clone()
    other[1, 0, 0, 0, 0, 0] += 1.0  # one value changed
    assert sums != measure._block_sums(other, [0, 1])
    moved = cache.clone()
    moved[0, 0, 0, 0, 0, :2] = cache[0, 0, 0, 0, 0, [1, 0]]  # two values swapped within a block: same byte sum
    assert measure._block_sums(moved, [0])[0][0] == sums[0][0]
    assert measure._block_sums(moved, [0]) != sums[:1]


def test_transfer_is_measured_from_another_process(capfd):
    # 16 tokens = 1 block, 40 tokens = 3 blocks (the last partial): raw 4096 B a block, fp8 1536 B (1024 B of codes
    # + 512 B of scales); adjacent ids on both sides, so each READ is one descriptor
    out, per_token = measure.measure_transfer(_engine(), [16, 40], repeats=1)
    assert out["raw"]["bytes"] == [RAW_BLOCK, 3 * RAW_BLOCK] == [4096, 12288]
    assert out["fp8"]["bytes"] == [FP8_BLOCK, 3 * FP8_BLOCK] == [1536, 4608]
    assert per_token == {"raw": 256.0, "fp8": 96.0}
    for wire in ("raw", "fp8"):
        rows = out[wire]
        assert rows["tokens"] == [16, 40] and rows["descriptors"] == [1, 1]
        assert rows["placement"] == "adjacent" and rows["processes"] == 2
        assert all(ms > 0 for ms in rows["ms"]) and all(ms >= 0 for ms in rows["export_ms"])
    pids = re.search(r"exporter pid (\d+), reader pid (\d+)", capfd.readouterr().err)
    assert pids and int(pids[2]) == os.getpid() and int(pids[1]) != os.getpid()


def test_scattered_placement_is_one_descriptor_per_block():
    # raw: every other block on both sides, so 3 blocks are 3 runs; fp8 reads the exporter's staged copy into the
    # reader's staging, both contiguous whatever the cache blocks: one descriptor
    out, _ = measure.measure_transfer(_engine(), [40], repeats=1, placement="scattered")
    assert out["raw"]["descriptors"] == [3] and out["fp8"]["descriptors"] == [1]
    assert out["raw"]["placement"] == "scattered"


def test_a_failing_exporter_is_one_error():
    # an int64 cache: the exporter's NIXL agent refuses it; its error comes back as one, nothing hangs
    with pytest.raises(RuntimeError, match="exporter process failed: KVTransferError: kv_cache dtype torch.int64"):
        measure.measure_transfer(_engine(torch.int64), [16], repeats=1)


def test_profile_cli_on_cpu_measures_the_transfer_between_two_processes(tmp_path):
    # the whole `pdserve profile --device cpu` with tiny lists (10-40 s on the 2-core box): the same code as on a GPU
    import json
    import subprocess
    import sys

    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "pdserve", "profile", "--device", "cpu", "--out", str(out),
                        "--prefill-tokens", "16,32", "--batches", "1,2", "--contexts", "16,32", "--decode-steps", "2",
                        "--repeats", "1", "--transfer-tokens", "16,40"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    prof = json.loads(out.read_text())
    assert prof["transfer"]["raw"]["processes"] == 2 and prof["transfer"]["raw"]["placement"] == "adjacent"
    assert prof["transfer"]["raw"]["descriptors"] == [1, 1]
    assert "exporter pid" in r.stderr


def test_host_contention_times_engines_stepping_at_once():
    """Two engine processes of the embedded model: one alone, then both at once; the ratio is the slowdown the
    simulator applies beyond processor sharing (contention.excess)."""
    from pdserve.planner import contention

    c = contention.measure_host_contention(2, None, "float32", "auto", 1, seconds=1.0, passes=1, log=lambda m: None)
    assert c["engines"] == [1, 2] and c["slowdown"][0] == 1.0
    assert all(ms > 0 for ms in c["step_ms"])
    assert c["slowdown"][1] == pytest.approx(c["step_ms"][1] / c["step_ms"][0], rel=1e-3)
    # on a box of `cores`, beyond processor sharing: k = 2 on 2 cores is all excess; past the measured k the last
    c = {"cores": 2, "engines": [1, 2, 3], "slowdown": [1.0, 1.2, 1.8]}
    assert contention.excess(c, 1, 2) == 1.0
    assert contention.excess(c, 2, 2) == pytest.approx(1.2)
    assert contention.excess(c, 3, 2) == pytest.approx(1.2)  # 1.8 / (3 / 2)
    assert contention.excess(c, 5, 1) == pytest.approx(1.2)  # measured at 2 cores, whatever the sim shares
    assert contention.excess(None, 4, 2) == 1.0


def test_host_contention_reports_a_failing_engine_process():
    from pdserve.planner import contention

    with pytest.raises(RuntimeError, match="contention engine process 0 failed: .*no-such-model"):
        contention.measure_host_contention(1, "/no-such-model.gguf", "float32", "auto", 1, seconds=0.5, passes=1)
