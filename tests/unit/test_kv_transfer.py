"""kv_transfer: FP8 wire numerics, and real NIXL agents (UCX over DRAM) moving KV blocks.

No mocks: every transfer below is a NIXL READ between registered CPU tensors, in this process
or (test_two_processes*) from a second Python process.
"""
import base64
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import torch

from pdserve.kv_transfer import (
    FP8_KV_EPS,
    KVTransferAgent,
    KVTransferBusy,
    KVTransferError,
    dequantize_kv,
    quantize_kv,
)
from pdserve.kv_transfer.fp8_wire import fp8_block_bytes, pack_fp8_blocks, unpack_fp8_blocks
from pdserve.testing.cluster import NEUTRAL_CWD

LAYERS, BLOCK, HEADS, DIM = 2, 4, 2, 8


# ---- FP8 wire numerics ------------------------------------------------------------------


def _bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # e4m3: 3 mantissa bits (half an ulp is |y|/16), subnormal step 2^-9 (half is 2^-10), in units of s
    return x.float().abs() / 16 + scales.unsqueeze(-1) / 1024


def test_fp8_round_trip_within_bound():
    g = torch.Generator().manual_seed(0)
    # per-token magnitudes from 1e-4 to 1e3 so both normal and subnormal codes occur
    x = torch.randn(3, 5, 16, 4, 64, generator=g) * torch.logspace(-4, 3, 16).view(1, 1, 16, 1, 1)
    original = x.clone()
    codes, scales = quantize_kv(x)
    assert torch.equal(x, original)  # fp32 input: the in-place steps must work on a copy
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    back = dequantize_kv(codes, scales, torch.float32)
    err = (back - x).abs()
    assert (err <= _bound(x, scales)).all()
    # uint8 bits of the codes dequantize identically (that is what travels)
    assert torch.equal(dequantize_kv(codes.view(torch.uint8), scales), back)
    # the largest element of each token-head maps to code +-448, so it comes back almost exactly
    amax = x.abs().amax(-1)
    assert torch.allclose(back.abs().amax(-1), amax, rtol=1e-6, atol=0)
    # a bf16 destination adds one bf16 rounding on top
    back16 = dequantize_kv(codes, scales, torch.bfloat16).float()
    assert ((back16 - x).abs() <= _bound(x, scales) + back.abs() / 256).all()


def test_fp8_scale_is_max_amax_eps_over_448():
    x = torch.randn(7, 3, 32, dtype=torch.bfloat16)
    _, scales = quantize_kv(x)
    assert torch.equal(scales, x.float().abs().amax(-1).clamp_min(FP8_KV_EPS) / 448)


def test_fp8_zero_tokens_and_eps():
    x = torch.zeros(2, 4, 3, 16)
    x[1, 2, 1] = 3e-9  # a head whose amax is below eps
    codes, scales = quantize_kv(x)
    assert torch.isfinite(scales).all()
    assert (scales[0] == torch.tensor(FP8_KV_EPS) / 448).all()
    assert (codes.view(torch.uint8)[0] == 0).all()
    back = dequantize_kv(codes, scales)
    assert (back[0] == 0).all()
    tiny = back[1, 2, 1]
    assert torch.isfinite(tiny).all()
    assert ((tiny - 3e-9).abs() <= 3e-9 / 16 + scales[1, 2, 1] / 1024).all()


def test_fp8_clamps_before_the_cast():
    # find amax values for which amax / (amax / 448) lands above 448 in fp32: such a quotient
    # overflows e4m3, which is NaN on builds whose cast does not saturate (this CPU build's does,
    # so here the contract is checked; the GPU test compares the device's bytes with these)
    amax = torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 100 + 1e-3
    quotient = amax / (amax / 448)
    over = amax[quotient > 448]
    assert over.numel() > 0, "no fp32 overshoot found; the test lost its point"
    x = torch.zeros(over.numel(), 1, 4)
    x[:, 0, 0] = over
    x[:, 0, 1] = -over
    codes, scales = quantize_kv(x)
    assert (codes[:, 0, 0].float() == 448).all() and (codes[:, 0, 1].float() == -448).all()
    # and no NaN anywhere over a wide dynamic range
    wide = torch.randn(64, 8, 32) * torch.logspace(-30, 30, 32)
    assert not torch.isnan(quantize_kv(wide)[0].float()).any()


def test_fp8_matches_the_fp8_kv_cache_quantizer():
    from pdserve.kernels.reference import quantize_fp8_per_head

    x = torch.randn(4, 8, 2, 64, dtype=torch.bfloat16)
    codes, scales = quantize_kv(x)
    ref_codes, ref_scales = quantize_fp8_per_head(x)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales, ref_scales)


def test_fp8_pack_unpack_zeroes_the_partial_tail():
    blocks = torch.randn(3, LAYERS, 2, BLOCK, HEADS, DIM)
    blocks[2, :, :, 2:] = float("nan")  # slots past num_tokens may hold anything
    shape = tuple(blocks.shape[1:])
    wire = torch.empty(3, fp8_block_bytes(shape), dtype=torch.uint8)
    pack_fp8_blocks(blocks, 2 * BLOCK + 2, wire)
    out = unpack_fp8_blocks(wire, shape, torch.float32)
    assert out.shape == blocks.shape
    assert (out[2, :, :, 2:] == 0).all()
    valid = torch.cat([blocks[:2].reshape(-1, DIM), blocks[2, :, :, :2].reshape(-1, DIM)])
    got = torch.cat([out[:2].reshape(-1, DIM), out[2, :, :, :2].reshape(-1, DIM)])
    _, scales = quantize_kv(valid)
    assert ((got - valid).abs() <= _bound(valid, scales)).all()


def test_fp8_by_block_id_is_gather_pack_and_unpack_index_copy():
    # the agent's entry points (kernels/kv_wire.py on CUDA: tests/gpu/test_kv_wire_kernels.py); here the torch path
    from pdserve.kv_transfer.fp8_wire import pack_fp8_cache_blocks, unpack_fp8_into_cache

    cache = torch.randn(6, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    shape, ids, num_tokens = tuple(cache.shape[1:]), [4, 0, 5], 2 * BLOCK + 1
    wire, ref = (torch.full((3, fp8_block_bytes(shape)), 0xFF, dtype=torch.uint8) for _ in range(2))
    pack_fp8_cache_blocks(cache, ids, num_tokens, wire)
    pack_fp8_blocks(cache[ids], num_tokens, ref)
    assert torch.equal(wire, ref)
    with pytest.raises(ValueError):
        pack_fp8_cache_blocks(cache, ids, 2 * BLOCK, wire)  # the last block would be empty
    dst = torch.full((4, *shape), float("nan"))
    want = dst.clone()
    unpack_fp8_into_cache(wire, dst, torch.tensor([3, 1, 0]))
    want[[3, 1, 0]] = unpack_fp8_blocks(ref, shape, torch.float32)
    assert torch.equal(dst.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_wire_on_gpu_is_the_cpu_bytes():
    # values spanning normal, subnormal and clamp-overshoot cases; GPU casts must match the CPU
    g = torch.Generator().manual_seed(4)
    blocks = torch.randn(5, LAYERS, 2, BLOCK, HEADS, 64, generator=g) * torch.logspace(-6, 4, 64)
    blocks[1, 0, 0, 0, 0] = 0
    for dtype in (torch.float32, torch.bfloat16):
        x = blocks.to(dtype)
        codes, scales = quantize_kv(x)
        gcodes, gscales = quantize_kv(x.cuda())
        assert torch.equal(gcodes.view(torch.uint8).cpu(), codes.view(torch.uint8))
        assert torch.equal(gscales.cpu(), scales)
        shape = tuple(x.shape[1:])
        wire = torch.empty(5, fp8_block_bytes(shape), dtype=torch.uint8)
        gwire = wire.cuda()
        pack_fp8_blocks(x, 4 * BLOCK + 1, wire)
        pack_fp8_blocks(x.cuda(), 4 * BLOCK + 1, gwire)
        assert torch.equal(gwire.cpu(), wire)
        for out in (torch.float32, torch.bfloat16):
            assert torch.equal(unpack_fp8_blocks(gwire, shape, out).cpu(), unpack_fp8_blocks(wire, shape, out))


# ---- agents -----------------------------------------------------------------------------


@pytest.fixture
def make_agent():
    """Builds agents with names unique to this test; closes them all afterwards."""
    agents = []
    tag = uuid.uuid4().hex[:8]

    def make(role, cache, **kwargs):
        agent = KVTransferAgent(f"{role}-{tag}", cache, **kwargs)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def _cache(num_blocks, dtype, seed=0, head_dim=DIM):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, LAYERS, 2, BLOCK, HEADS, head_dim, generator=g).to(dtype)


def _poll_until(agent, count, timeout=5.0):
    released = []
    deadline = time.monotonic() + timeout
    while len(released) < count and time.monotonic() < deadline:
        released += agent.poll()
        time.sleep(0.002)
    return released


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_raw_round_trip_is_byte_exact(make_agent, dtype):
    log = []
    src = _cache(12, dtype)
    dst = torch.zeros(9, LAYERS, 2, BLOCK, HEADS, DIM, dtype=dtype)
    prefill = make_agent("prefill", src, on_release=lambda r, why: log.append((r, why)))
    decode = make_agent("decode", dst)
    src_ids, dst_ids = [7, 2, 11, 0], [8, 3, 5, 1]
    ticket = prefill.export("req-1", src_ids, 3 * BLOCK + 1)
    handle = decode.pull(ticket, dst_ids)
    assert decode.wait(handle, 5.0) == "DONE", handle.error
    assert torch.equal(_bits(dst[dst_ids]), _bits(src[src_ids]))
    untouched = [b for b in range(9) if b not in dst_ids]
    assert (dst[untouched] == 0).all()
    assert _poll_until(prefill, 1) == [("req-1", "done")]
    assert log == [("req-1", "done")]

    nbytes = len(src_ids) * LAYERS * 2 * BLOCK * HEADS * DIM * dtype.itemsize
    sent, got = prefill.stats(), decode.stats()
    assert sent["bytes_exported"] == sent["bytes_sent"] == nbytes
    assert sent["released"] == {"done": 1, "expired": 0, "cancelled": 0}
    assert sent["active_leases"] == 0
    assert got["bytes_received"] == handle.bytes == nbytes
    assert got["pulls_done"] == 1 and got["pending_pulls"] == 0
    assert got["transfer_seconds"] == handle.seconds > 0
    assert got["recent"][-1] == {
        "role": "pull", "request_id": "req-1", "outcome": "done", "bytes": nbytes, "seconds": handle.seconds,
    }
    # nothing more to release, ever
    time.sleep(0.05)
    assert prefill.poll() == [] and log == [("req-1", "done")]
    assert prefill.cancel("req-1") is False


@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_raw_wire_casts_between_cache_dtypes(make_agent, src_dtype, dst_dtype):
    src = _cache(6, src_dtype, seed=3)
    dst = torch.zeros(10, LAYERS, 2, BLOCK, HEADS, DIM, dtype=dst_dtype)
    prefill = make_agent("prefill", src)
    decode = make_agent("decode", dst)
    handle = decode.pull(prefill.export("r", [4, 1], 2 * BLOCK), [9, 2])
    assert decode.wait(handle, 5.0) == "DONE", handle.error
    # the source dtype travels (staged), the cast happens on arrival
    assert handle.bytes == 2 * LAYERS * 2 * BLOCK * HEADS * DIM * src_dtype.itemsize
    assert torch.equal(_bits(dst[[9, 2]]), _bits(src[[4, 1]].to(dst_dtype)))
    assert decode.stats()["staging_bytes_in_use"] == 0
    assert _poll_until(prefill, 1) == [("r", "done")]


@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float32])
def test_fp8_wire_round_trip(make_agent, dst_dtype):
    src = _cache(8, torch.float32, seed=5) * 3
    dst = torch.zeros(5, LAYERS, 2, BLOCK, HEADS, DIM, dtype=dst_dtype)
    released = []
    prefill = make_agent("prefill", src, wire_dtype="fp8", on_release=lambda r, why: released.append(why))
    decode = make_agent("decode", dst)
    src_ids, dst_ids, num_tokens = [6, 0, 3], [1, 4, 0], 2 * BLOCK + 3
    ticket = prefill.export("r8", src_ids, num_tokens)
    assert prefill.stats()["staging_bytes_in_use"] > 0
    handle = decode.pull(ticket, dst_ids)
    assert decode.wait(handle, 5.0) == "DONE", handle.error

    wire_block = fp8_block_bytes((LAYERS, 2, BLOCK, HEADS, DIM))
    assert handle.bytes == 3 * wire_block == decode.stats()["bytes_received"]
    # one code byte per element plus one fp32 scale per head_dim elements, under a bf16 wire
    assert wire_block == LAYERS * 2 * BLOCK * HEADS * (DIM + 4) < src[0].numel() * 2
    want, got = src[src_ids], dst[dst_ids].float()
    _, scales = quantize_kv(want)
    bound = _bound(want, scales) + (want.abs() * 1.07 / 256 if dst_dtype == torch.bfloat16 else 0)
    valid = torch.ones_like(want, dtype=torch.bool)
    valid[2, :, :, num_tokens - 2 * BLOCK:] = False
    assert ((got - want).abs() <= bound)[valid].all()
    assert (got[~valid] == 0).all()
    assert _poll_until(prefill, 1) == [("r8", "done")] and released == ["done"]
    assert prefill.stats()["staging_bytes_in_use"] == 0
    assert prefill.stats()["bytes_sent"] == handle.bytes


def test_engine_inference_tensors_as_caches(make_agent):
    # the engine may allocate its cache under torch.inference_mode(); landing writes it in place
    with torch.inference_mode():
        src = _cache(4, torch.float32, seed=2)
        dst = torch.zeros(4, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    prefill = make_agent("prefill", src, wire_dtype="fp8")
    decode = make_agent("decode", dst)
    handle = decode.pull(prefill.export("inf", [3], BLOCK), [1])
    assert decode.wait(handle, 5.0) == "DONE", handle.error
    assert handle.settled
    codes, scales = quantize_kv(src[3])
    assert torch.equal(dst[1], dequantize_kv(codes, scales, torch.bfloat16))


def test_lease_expires_when_nobody_pulls(make_agent):
    log = []
    src = _cache(4, torch.bfloat16)
    prefill = make_agent("prefill", src, wire_dtype="fp8", lease_seconds=1.0,
                         on_release=lambda r, why: log.append((r, why)))
    decode = make_agent("decode", torch.zeros_like(src))
    ticket = prefill.export("lonely", [1, 2], BLOCK + 1)
    assert prefill.poll() == [] and prefill.held() == ["lonely"]
    time.sleep(1.0)
    assert prefill.poll() == [("lonely", "expired")]
    assert prefill.poll() == [] and log == [("lonely", "expired")]
    stats = prefill.stats()
    assert stats["released"]["expired"] == 1 and stats["bytes_sent"] == 0
    assert stats["staging_bytes_in_use"] == 0 and prefill.held() == []
    # a reader that turns up late is refused: the blocks may already hold another request
    with pytest.raises(KVTransferError, match="expired"):
        decode.pull(ticket, [0, 3])


def test_reader_refuses_completion_after_the_deadline(make_agent):
    src = _cache(4, torch.float32)
    dst = torch.zeros_like(src)
    prefill = make_agent("prefill", src, lease_seconds=1.0)
    decode = make_agent("decode", dst)
    handle = decode.pull(prefill.export("slow", [0], 1), [2])
    time.sleep(1.0)  # the READ finished long ago, but nobody looked before the deadline
    assert decode.check(handle) == "ERROR"
    assert "deadline" in handle.error
    assert decode.stats()["pulls_failed"] == 1 and decode.stats()["bytes_received"] == 0


def test_cancel_releases_once_from_poll(make_agent):
    log = []
    src = _cache(6, torch.float32)
    prefill = make_agent("prefill", src, on_release=lambda r, why: log.append((r, why)))
    decode = make_agent("decode", torch.zeros_like(src))
    ticket = prefill.export("c1", [3, 4], 2 * BLOCK)
    prefill.export("c2", [5], 1)
    assert prefill.cancel("c1") is True
    assert log == []  # delivered by poll(), not inside cancel()
    assert prefill.cancel("c1") is False and prefill.cancel("never-exported") is False
    assert prefill.poll() == [("c1", "cancelled")]
    assert prefill.held() == ["c2"]
    # a reader still holding the ticket completes; its notification is late and frees nothing twice
    handle = decode.pull(ticket, [0, 1])
    assert decode.wait(handle, 5.0) == "DONE"
    deadline = time.monotonic() + 5
    while prefill.stats()["late_notifications"] == 0 and time.monotonic() < deadline:
        assert prefill.poll() == []
        time.sleep(0.002)
    assert prefill.stats()["late_notifications"] == 1
    assert log == [("c1", "cancelled")]
    # close() releases what is still held, as cancelled
    assert prefill.close() == [("c2", "cancelled")]
    assert log == [("c1", "cancelled"), ("c2", "cancelled")]


def test_coalesce_runs_merges_only_blocks_adjacent_on_both_sides():
    from pdserve.kv_transfer.transport import coalesce_runs

    # blocks 0-1 adjacent on both sides, 2 adjacent only locally, 3-4 adjacent on both again
    local = [1000, 1010, 1020, 1030, 1040]
    remote = [50, 60, 90, 200, 210]
    assert coalesce_runs(local, remote, 10) == ([1000, 1020, 1030], [50, 90, 200], [20, 10, 20])
    assert coalesce_runs([], [], 10) == ([], [], [])
    assert coalesce_runs([7], [3], 10) == ([7], [3], [10])


def test_adjacent_blocks_travel_as_one_descriptor_each_run(make_agent):
    src = _cache(16, torch.bfloat16, seed=3)
    dst = torch.zeros(16, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    prefill = make_agent("prefill", src)
    decode = make_agent("decode", dst)
    # three runs adjacent on both sides: [2 3 4] -> [9 10 11], [8] -> [0], [12 13] -> [14 15]
    src_ids, dst_ids = [2, 3, 4, 8, 12, 13], [9, 10, 11, 0, 14, 15]
    handle = decode.pull(prefill.export("runs", src_ids, 6 * BLOCK), dst_ids)
    assert decode.wait(handle, 5.0) == "DONE", handle.error
    assert handle.descriptors == 3 and decode.stats()["descriptors"] == 3
    assert torch.equal(_bits(dst[dst_ids]), _bits(src[src_ids]))
    assert (dst[[b for b in range(16) if b not in dst_ids]] == 0).all()


def test_many_requests_each_released_exactly_once(make_agent):
    log = []
    src = _cache(32, torch.bfloat16, seed=9)
    dst = torch.zeros(40, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    prefill = make_agent("prefill", src, on_release=lambda r, why: log.append((r, why)))
    decode = make_agent("decode", dst)
    handles = []
    for i in range(16):
        ids = [(2 * i) % 32, (2 * i + 1) % 32]
        handles.append((decode.pull(prefill.export(f"m{i}", ids, 2 * BLOCK), [39 - 2 * i, 38 - 2 * i]), ids))
    for handle, ids in handles:
        assert decode.wait(handle, 5.0) == "DONE"
        assert torch.equal(_bits(dst[handle.local_block_ids]), _bits(src[ids]))
    released = _poll_until(prefill, 16)
    assert sorted(released) == sorted((f"m{i}", "done") for i in range(16))
    assert sorted(log) == sorted(released)
    assert prefill.stats()["bytes_sent"] == decode.stats()["bytes_received"] == 16 * 2 * src[0].numel() * 2


def test_reader_abort_releases_exactly_once(make_agent):
    log = []
    src = _cache(4, torch.float32)
    prefill = make_agent("prefill", src, wire_dtype="fp8", on_release=lambda r, why: log.append(why))
    decode = make_agent("decode", torch.zeros_like(src))
    handle = decode.pull(prefill.export("gone", [0, 1], 2 * BLOCK), [2, 3])
    decode.abort(handle)  # the READ may already have finished: both messages then reach the exporter
    assert handle.state == "ERROR" and handle.error == "aborted by the reader" and handle.settled
    assert decode.check(handle) == "ERROR"
    released = _poll_until(prefill, 1)
    assert len(released) == 1 and released[0][1] in ("done", "cancelled")
    time.sleep(0.05)
    assert prefill.poll() == [] and len(log) == 1
    assert decode.stats()["staging_bytes_in_use"] == 0 and prefill.stats()["staging_bytes_in_use"] == 0


def test_restarted_peer_with_the_same_name_is_reloaded():
    name = f"prefill-{uuid.uuid4().hex[:8]}"
    dst = torch.zeros(4, LAYERS, 2, BLOCK, HEADS, DIM)
    with KVTransferAgent(f"decode-{name}", dst) as decode:
        for seed in (1, 2):
            src = _cache(4, torch.float32, seed=seed)
            with KVTransferAgent(name, src) as prefill:
                assert decode.add_peer(prefill.metadata()) == name
                handle = decode.pull(prefill.export("same", [3], 1), [0])
                assert decode.wait(handle, 5.0) == "DONE", handle.error
                assert torch.equal(dst[0], src[3])


def test_idle_agents_do_not_spin():
    import resource

    caches = [_cache(4, torch.bfloat16) for _ in range(2)]
    agents = [KVTransferAgent(f"idle{i}-{uuid.uuid4().hex[:8]}", c) for i, c in enumerate(caches)]
    try:
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        time.sleep(0.5)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        # nixl_agent's default progress thread would burn ~1 core per agent here
        assert cpu / (time.monotonic() - start) < 0.5
    finally:
        for agent in agents:
            agent.close()


def test_poll_from_another_thread(make_agent):
    import threading

    log = []
    src = _cache(48, torch.bfloat16, seed=6)
    dst = torch.zeros(48, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    prefill = make_agent("prefill", src, wire_dtype="fp8", on_release=lambda r, why: log.append((r, why)))
    decode = make_agent("decode", dst)
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            prefill.poll()

    thread = threading.Thread(target=poller)
    thread.start()
    try:
        for i in range(24):
            handle = decode.pull(prefill.export(f"t{i}", [2 * i, 2 * i + 1], 2 * BLOCK), [47 - 2 * i, 46 - 2 * i])
            assert decode.wait(handle, 5.0) == "DONE", handle.error
        deadline = time.monotonic() + 5
        while len(log) < 24 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    assert sorted(log) == sorted((f"t{i}", "done") for i in range(24))
    assert prefill.stats()["staging_bytes_in_use"] == 0 and prefill.held() == []


def test_mismatched_layout_is_refused(make_agent):
    src = _cache(4, torch.bfloat16)
    prefill = make_agent("prefill", src)
    decode = make_agent("decode", _cache(4, torch.bfloat16, head_dim=DIM * 2))
    with pytest.raises(KVTransferError, match="head_dim 8 .source. != 16 .destination."):
        decode.pull(prefill.export("x", [0], 1), [0])
    with pytest.raises(KVTransferError, match="incompatible"):
        decode.add_peer(prefill.metadata())
    with pytest.raises(KVTransferError, match="must be"):
        make_agent("bad", torch.zeros(4, 2, 3, 4, 2, 8))


def test_bad_tickets_are_refused(make_agent):
    src = _cache(6, torch.float32)
    prefill = make_agent("prefill", src)
    decode = make_agent("decode", torch.zeros_like(src))
    good = prefill.export("t", [1, 2], 2 * BLOCK)
    msg = msgpack.unpackb(good, raw=False)

    def tampered(**changes):
        return msgpack.packb({**msg, **changes}, use_bin_type=True)

    cases = [
        (b"\x00garbage", "not msgpack"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (tampered(v=99), "version"),
        (tampered(addrs=b"\x01\x02\x03"), "addrs"),
        (tampered(num_tokens=2 * BLOCK + 1), "num_tokens"),
        (tampered(wire="zstd"), "wire format"),
        (tampered(token=b""), "token"),
        (tampered(layout={**msg["layout"], "dtype": "int8"}), "dtype"),
        (tampered(wire_block_bytes=123), "wire block"),
        (tampered(agent="somebody-else"), "names agent"),
        # addresses outside anything the exporter registered: NIXL itself refuses
        (tampered(addrs=(4096).to_bytes(8, "little") * 2), "cannot READ"),
        ("not bytes", "expected bytes"),
    ]
    for ticket, why in cases:
        with pytest.raises(KVTransferError, match=why):
            decode.pull(ticket, [0, 1])
    for ids, why in (([0], "2 block"), ([0, 0], "duplicate"), ([0, 6], "outside")):
        with pytest.raises(KVTransferError, match=why):
            decode.pull(good, ids)
    assert decode.stats()["pulls"] == 0 and decode.stats()["staging_bytes_in_use"] == 0
    # the genuine ticket still works after all that
    handle = decode.pull(good, [4, 5])
    assert decode.wait(handle, 5.0) == "DONE"
    assert torch.equal(decode.kv_cache[[4, 5]], src[[1, 2]])


def test_export_validates_its_arguments(make_agent):
    prefill = make_agent("prefill", _cache(4, torch.bfloat16))
    for ids, tokens, why in (([], 1, "no block ids"), ([4], 1, "outside"), ([1, 1], 5, "duplicate"),
                             ([1, 2], BLOCK, "num_tokens"), ([1, 2], 2 * BLOCK + 1, "num_tokens")):
        with pytest.raises(KVTransferError, match=why):
            prefill.export("v", ids, tokens)
    prefill.export("v", [0], 1)
    with pytest.raises(KVTransferError, match="already exported"):
        prefill.export("v", [1], 1)
    with pytest.raises(KVTransferError, match="wire_dtype"):
        make_agent("bad", _cache(2, torch.bfloat16), wire_dtype="int4")


def test_staging_pool_limits(make_agent):
    src = _cache(16, torch.bfloat16)
    # 2 float32-block slots of staging = about 8 fp8 blocks of this layout
    prefill = make_agent("prefill", src, wire_dtype="fp8", staging_blocks=2)
    with pytest.raises(KVTransferError, match="raise staging_blocks"):
        prefill.export("huge", list(range(16)), 16 * BLOCK)
    prefill.export("a", [0, 1, 2, 3, 4], 5 * BLOCK)
    with pytest.raises(KVTransferBusy, match="full"):
        prefill.export("b", [5, 6, 7, 8, 9], 5 * BLOCK)
    prefill.cancel("a")
    prefill.poll()
    prefill.export("b", [5, 6, 7, 8, 9], 5 * BLOCK)


def test_from_config():
    from pdserve.config import KVTransferConfig

    agent = KVTransferAgent.from_config(f"cfg-{uuid.uuid4().hex[:8]}", _cache(2, torch.bfloat16),
                                        KVTransferConfig(dtype="fp8", lease_seconds=5.0))
    try:
        assert agent.wire_dtype == "fp8" and agent.lease_seconds == 5.0
    finally:
        agent.close()
    from pdserve.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="kv_transfer.backend"):  # nothing but NIXL is implemented
        load_config(None, {"kv_transfer.backend": "tcp-fallback"})


def test_missing_nixl_is_named(monkeypatch):
    from pdserve.kv_transfer.transport import load_nixl_bindings

    monkeypatch.setitem(sys.modules, "nixl._api", None)  # None in sys.modules makes import fail
    monkeypatch.setitem(sys.modules, "nixl_cu12._api", None)
    with pytest.raises(KVTransferError, match="NIXL is not installed.*pip install nixl-cu12"):
        load_nixl_bindings()


# ---- across processes -------------------------------------------------------------------

_EXPORTER = r"""
import base64, os, sys, time, torch
from pdserve.kv_transfer import KVTransferAgent
name, mode = sys.argv[1], sys.argv[2]
cache = torch.randn(8, {layers}, 2, {block}, {heads}, {dim}, generator=torch.Generator().manual_seed(11))
released = []
agent = KVTransferAgent(name, cache, lease_seconds=10.0, on_release=lambda r, why: released.append(why))
print("@@", base64.b64encode(agent.export("x", [6, 1, 4], 2 * {block} + 1)).decode(), flush=True)
if mode == "die":
    print("@@", base64.b64encode(agent.export("y", [0, 2, 3], 3 * {block})).decode(), flush=True)
deadline = time.monotonic() + 20
while not released and time.monotonic() < deadline:
    agent.poll()
    time.sleep(0.002)
print("@@", released[0] if released else "nothing", agent.stats()["bytes_sent"], flush=True)
if mode == "die":
    os._exit(0)  # gone without a word, "y" still leased: its reader must fail cleanly
agent.close()
""".format(layers=LAYERS, block=BLOCK, heads=HEADS, dim=DIM)


def _exporter(mode):
    name = f"proc-exporter-{uuid.uuid4().hex[:8]}"
    return subprocess.Popen([sys.executable, "-c", _EXPORTER, name, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=NEUTRAL_CWD)


def _said(child) -> list:
    """The child's next protocol line ("@@ ..."); NIXL logs to stdout as well."""
    for line in child.stdout:
        if line.startswith("@@ "):
            return line.split()[1:]
    raise AssertionError("the exporter process ended without answering")


def test_two_processes_byte_exact_and_done(make_agent):
    child = _exporter("serve")
    try:
        ticket = base64.b64decode(_said(child)[0])
        expected = torch.randn(8, LAYERS, 2, BLOCK, HEADS, DIM, generator=torch.Generator().manual_seed(11))
        dst = torch.zeros(5, LAYERS, 2, BLOCK, HEADS, DIM)
        decode = make_agent("decode", dst)
        handle = decode.pull(ticket, [4, 0, 2])
        assert decode.wait(handle, 10.0) == "DONE", handle.error
        assert torch.equal(_bits(dst[[4, 0, 2]]), _bits(expected[[6, 1, 4]]))
        reason, sent = _said(child)
        assert reason == "done" and int(sent) == handle.bytes == 3 * expected[0].numel() * 4
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()


def test_two_processes_exporter_gone(make_agent):
    child = _exporter("die")
    try:
        first, second = base64.b64decode(_said(child)[0]), base64.b64decode(_said(child)[0])
        decode = make_agent("decode", torch.zeros(5, LAYERS, 2, BLOCK, HEADS, DIM))
        done = decode.pull(first, [0, 1, 2])  # loads the exporter's metadata while it lives
        assert decode.wait(done, 10.0) == "DONE", done.error
        assert _said(child)[0] == "done"
        assert child.wait(timeout=20) == 0
        started = time.monotonic()
        for reader in (decode, make_agent("fresh", torch.zeros(5, LAYERS, 2, BLOCK, HEADS, DIM))):
            try:
                handle = reader.pull(second, [2, 3, 4])
            except KVTransferError as exc:
                assert "gone" in str(exc)
            else:
                assert reader.wait(handle, 15.0) == "ERROR"
                assert "gone" in handle.error
            stats = reader.stats()
            assert stats["pending_pulls"] == 0 and stats["staging_bytes_in_use"] == 0
        assert time.monotonic() - started < 15
        assert decode.stats()["bytes_received"] == done.bytes
    finally:
        child.kill()
