"""KVTransferAgent: one NIXL agent (UCX backend) per worker, with its KV cache registered.

Prefill side (exporter):  ticket = agent.export(request_id, block_ids, num_tokens)
    The blocks are leased: the owner must not reuse them until on_release(request_id, reason)
    runs, exactly once, from poll(): "done" (the reader's READ completed), "expired" (no
    completed READ within lease_seconds) or "cancelled" (cancel(), the reader aborted, close()).
Decode side (reader):     handle = agent.pull(ticket, local_block_ids); agent.check(handle)
    check() never blocks; once it returns "DONE" the blocks are in this agent's cache.

Invariants
- A reader accepts data only if its READ completed before the ticket's expires_at minus a
  safety margin (wall clock; hosts are assumed NTP-synced to well within that margin). The
  exporter frees on expiry only after expires_at, so a reader never lands reused blocks.
  After cancel() no such guarantee holds: a cancelled request is dead on both sides.
- In fp8 mode export() quantizes into the staging pool before returning, and the reader reads
  only that staged copy; the cache blocks are still leased so release has one meaning.
- Thread safety: every public method holds one internal lock (NIXL itself runs unsynchronized),
  so an agent may be shared by threads. on_release runs in the thread calling poll() or
  close(), outside the lock, so it may call back into the agent. No threads are started here
  beyond NIXL's own UCX progress thread (see transport.py), which serves the peers' READs
  without the owner's help; poll() only collects notifications and expiries.
"""
import logging
import secrets
import threading
import time
from typing import Callable, Optional, Sequence

import msgpack
import torch

from pdserve.config import KV_WIRE_DTYPES

from .errors import KVTransferBusy, KVTransferError
from .fp8_wire import fp8_block_bytes, pack_fp8_cache_blocks, unpack_fp8_into_cache
from .fp8_wire import warm_up as fp8_warm_up
from .lease import Lease, LeaseTable
from .staging import StagingPool
from .stats import TransferStats
from .ticket import KVLayout, TransferTicket
from .transport import NixlTransport, coalesce_runs

log = logging.getLogger(__name__)

METADATA_VERSION = 1
_ABORT = b"abort:"


def _safety_margin(lease_seconds: float) -> float:
    return min(1.0, 0.1 * lease_seconds)


class PullHandle:
    """One pull on the decode side. Read-only for callers; the agent updates it in check().

    settled: True once NIXL has let go of the READ (always after DONE). After ERROR it stays
    False only if NIXL could not cancel the READ: it may still write the local blocks, which
    must then not be reused before close().
    """

    def __init__(self, ticket: TransferTicket, local_block_ids: list, xfer, staging_offset):
        self.request_id = ticket.request_id
        self.source_agent = ticket.agent
        self.local_block_ids = local_block_ids
        self.num_tokens = ticket.num_tokens
        self.bytes = ticket.wire_bytes
        self.state = "PENDING"
        self.error: Optional[str] = None
        self.seconds: Optional[float] = None
        self.settled = False
        self.descriptors = 0  # NIXL descriptors of the READ: runs of blocks adjacent on both sides
        self._ticket = ticket
        self._xfer = xfer
        self._staging_offset = staging_offset
        self._accept_until = ticket.expires_at - _safety_margin(ticket.lease_seconds)
        self._started = time.perf_counter()

    def __repr__(self) -> str:
        return f"PullHandle({self.request_id!r}, {self.state}, {self.bytes} bytes)"


class KVTransferAgent:
    def __init__(
        self,
        name: str,
        kv_cache: torch.Tensor,
        wire_dtype: str = "bf16",
        lease_seconds: float = 30.0,
        on_release: Optional[Callable[[str, str], None]] = None,
        staging_blocks: int = 64,
        backend_params: Optional[dict] = None,
    ):
        """staging_blocks: capacity of the registered staging pool, in blocks of the widest wire
        format (4 bytes per element, a float32 block); a bf16 block takes half of such a slot, an
        fp8 block about a quarter. Staging holds fp8 copies at export and, at pull, fp8 blocks
        or blocks of a source dtype that differs from this cache's.
        backend_params: extra NIXL UCX backend parameters (transport.py), for experiments."""
        if wire_dtype not in KV_WIRE_DTYPES:
            raise KVTransferError(f"wire_dtype must be one of {KV_WIRE_DTYPES}, got {wire_dtype!r}")
        if lease_seconds <= 0:
            raise KVTransferError("lease_seconds must be positive")
        self.name = name
        self.layout = KVLayout.of(kv_cache)
        self.kv_cache = kv_cache
        self.wire_dtype = wire_dtype
        self.lease_seconds = float(lease_seconds)
        self._on_release = on_release
        self._mem = "DRAM" if kv_cache.device.type == "cpu" else "VRAM"
        self._device_id = max(kv_cache.get_device(), 0)
        block_numel = self.layout.block_bytes // self.layout.torch_dtype.itemsize
        capacity = max(0, staging_blocks) * block_numel * 4
        self._staging = torch.empty(capacity, dtype=torch.uint8, device=kv_cache.device)
        self._staging_pool = StagingPool(capacity)
        self._lock = threading.RLock()
        self._leases = LeaseTable()
        self._cancelled = []  # leases cancelled since the last poll()
        self._pulls = {}  # id(handle) -> handle, pending only
        self._stuck = []  # transfer handles NIXL refused to release; retried at close()
        self._remotes = {}  # agent name -> loaded NIXL metadata
        self._stats = TransferStats()
        self._closed = False
        self._nixl = NixlTransport(name, backend_params)
        try:
            self._registrations = [
                self._nixl.register(t.data_ptr(), t.numel() * t.element_size(), self._mem, self._device_id)
                for t in (kv_cache, self._staging)
                if t.numel()
            ]
        except Exception as exc:
            raise KVTransferError(f"NIXL could not register the KV cache of {name!r}: {exc}") from exc
        self._nixl_md = self._nixl.metadata()
        if kv_cache.is_cuda:  # any agent may export or receive fp8 blocks, whatever its own wire
            with torch.inference_mode():
                fp8_warm_up(kv_cache)

    @classmethod
    def from_config(cls, name: str, kv_cache: torch.Tensor, config, on_release=None, **kwargs) -> "KVTransferAgent":
        """Builds from pdserve.config.KVTransferConfig (dtype, lease_seconds)."""
        return cls(name, kv_cache, wire_dtype=config.dtype, lease_seconds=config.lease_seconds,
                   on_release=on_release, **kwargs)

    # ---- metadata -------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """msgpack: this agent's NIXL metadata and cache layout, for add_peer() on the other side."""
        return msgpack.packb(
            {
                "v": METADATA_VERSION,
                "agent": self.name,
                "nixl_md": self._nixl_md,
                "layout": self.layout.to_msg(),
                "wire_dtype": self.wire_dtype,
                "mem": self._mem,
                "device_id": self._device_id,
                "cache": [self.kv_cache.data_ptr(), self.kv_cache.numel() * self.kv_cache.element_size()],
                "staging": [self._staging.data_ptr(), self._staging.numel()],
            },
            use_bin_type=True,
        )

    def add_peer(self, metadata: bytes) -> str:
        """Loads a peer's metadata ahead of its first ticket and refuses an incompatible layout
        early. Optional: tickets carry the metadata too."""
        try:
            msg = msgpack.unpackb(bytes(metadata), raw=False, strict_map_key=True)
            ok = isinstance(msg, dict) and msg.get("v") == METADATA_VERSION
            name, nixl_md = (msg["agent"], msg["nixl_md"]) if ok else (None, None)
        except Exception as exc:
            raise KVTransferError(f"bad agent metadata: {exc}") from None
        if not isinstance(name, str) or not isinstance(nixl_md, bytes):
            raise KVTransferError("bad agent metadata: wrong version or missing fields")
        self.layout.check_compatible(KVLayout.from_msg(msg.get("layout")))
        with self._lock:
            self._load_remote(name, nixl_md)
        return name

    def _load_remote(self, name: str, nixl_md: bytes) -> None:
        if self._remotes.get(name) == nixl_md:
            return
        if name in self._remotes:  # the peer restarted under the same name
            self._nixl.remove_remote(name)
            del self._remotes[name]
        try:
            loaded = self._nixl.load_remote(nixl_md)
        except Exception as exc:
            raise KVTransferError(f"cannot reach agent {name!r} (gone?): loading its NIXL metadata failed: {exc}") from None
        if loaded != name:
            if loaded not in self._remotes:  # never unload a peer other pulls rely on
                self._nixl.remove_remote(loaded)
            raise KVTransferError(f"metadata names agent {loaded!r}, the ticket names {name!r}")
        self._remotes[name] = nixl_md

    def _forget_remote(self, name: str) -> None:
        """Drops a peer that failed us, unless other pulls from it are still in flight; a later
        ticket from it reloads (and re-connects) from the metadata the ticket carries."""
        if name not in self._remotes or any(h.source_agent == name for h in self._pulls.values()):
            return
        del self._remotes[name]
        try:
            self._nixl.remove_remote(name)
        except Exception:
            pass

    # ---- prefill side ---------------------------------------------------------------------

    def export(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> bytes:
        """Leases block_ids (request order) and returns the msgpack ticket for the reader."""
        ids = self._check_block_ids(block_ids, "export")
        n, block_size = len(ids), self.layout.block_size
        if not (n - 1) * block_size < num_tokens <= n * block_size:
            raise KVTransferError(
                f"num_tokens {num_tokens} does not fit {n} block(s) of {block_size} (only the last may be partial)"
            )
        with self._lock:
            self._check_open()
            if request_id in self._leases:
                raise KVTransferError(f"request {request_id!r} is already exported and not released")
            staging_offset = None
            if self.wire_dtype == "fp8":
                wire_block_bytes = fp8_block_bytes(self.layout.block_shape)
                staging_offset = self._alloc_staging(n * wire_block_bytes, request_id)
                started = time.perf_counter()
                wire = self._staging_view(staging_offset, n, wire_block_bytes)
                try:
                    with torch.inference_mode():  # the engine's cache may be an inference tensor
                        pack_fp8_cache_blocks(self.kv_cache, self._index(ids), num_tokens, wire)
                except BaseException:
                    self._staging_pool.free(staging_offset)
                    raise
                self._stats.stage_seconds += time.perf_counter() - started
                base = self._staging.data_ptr() + staging_offset
                addrs = tuple(base + i * wire_block_bytes for i in range(n))
            else:
                wire_block_bytes = self.layout.block_bytes
                base = self.kv_cache.data_ptr()
                addrs = tuple(base + b * wire_block_bytes for b in ids)
            if self.kv_cache.is_cuda:  # the READ must see the finished KV / staged codes
                torch.cuda.current_stream(self.kv_cache.device).synchronize()
            token = f"kv:{secrets.token_hex(8)}:{request_id}".encode()
            now = time.monotonic()
            ticket = TransferTicket(
                agent=self.name,
                nixl_md=self._nixl_md,
                request_id=request_id,
                token=token,
                layout=self.layout,
                wire="fp8" if self.wire_dtype == "fp8" else "raw",
                mem=self._mem,
                device_id=self._device_id,
                wire_block_bytes=wire_block_bytes,
                addrs=addrs,
                num_tokens=num_tokens,
                expires_at=time.time() + self.lease_seconds,
                lease_seconds=self.lease_seconds,
            )
            lease = Lease(request_id, token, tuple(ids), ticket.wire_bytes, now, now + self.lease_seconds, staging_offset)
            self._leases.add(lease)
            self._stats.exported += 1
            self._stats.bytes_exported += ticket.wire_bytes
            return ticket.encode()

    def cancel(self, request_id: str) -> bool:
        """Ends a lease early; on_release(request_id, "cancelled") follows from the next poll().
        Returns False when the request holds no lease (unknown or already released)."""
        with self._lock:
            lease = self._leases.pop_request(request_id)
            if lease is None:
                return False
            self._cancelled.append(lease)
            return True

    def held(self) -> list:
        """Request ids whose blocks are leased right now."""
        with self._lock:
            return self._leases.request_ids()

    def poll(self) -> list:
        """Collects done notifications and expired leases; calls on_release once per released
        request and returns [(request_id, reason), ...]."""
        with self._lock:
            released = [(lease, "cancelled") for lease in self._cancelled]
            self._cancelled = []
            if not self._closed:
                released += self._take_notifications()
            released += [(lease, "expired") for lease in self._leases.pop_expired(time.monotonic())]
            for lease, reason in released:
                self._settle(lease, reason)
        return self._deliver(released)

    def _take_notifications(self) -> list:
        released = []
        for messages in self._nixl.notifications().values():
            for message in messages:
                aborted = message.startswith(_ABORT)
                lease = self._leases.pop_token(message[len(_ABORT):] if aborted else message)
                if lease is None:
                    self._stats.late_notifications += 1
                else:
                    released.append((lease, "cancelled" if aborted else "done"))
        return released

    def _settle(self, lease: Lease, reason: str) -> None:
        if lease.staging_offset is not None:
            self._staging_pool.free(lease.staging_offset)
        self._stats.released[reason] += 1
        if reason == "done":
            self._stats.bytes_sent += lease.wire_bytes
        nbytes = lease.wire_bytes if reason == "done" else 0
        self._stats.record("export", lease.request_id, reason, nbytes, time.monotonic() - lease.started)

    def _deliver(self, released: list) -> list:
        out = [(lease.request_id, reason) for lease, reason in released]
        if self._on_release is not None:
            for request_id, reason in out:
                try:
                    self._on_release(request_id, reason)
                except Exception:  # one failing callback must not swallow the others' releases
                    log.exception("on_release(%r, %r) raised", request_id, reason)
        return out

    # ---- decode side ----------------------------------------------------------------------

    def pull(self, ticket: bytes, local_block_ids: Sequence[int]) -> PullHandle:
        """Starts block-granular READs of the ticket's blocks into local_block_ids (same order)."""
        t = TransferTicket.decode(ticket)
        self.layout.check_compatible(t.layout)
        ids = self._check_block_ids(local_block_ids, "pull")
        if len(ids) != t.num_blocks:
            raise KVTransferError(
                f"request {t.request_id!r} has {t.num_blocks} block(s), {len(ids)} local block id(s) given"
            )
        expected = fp8_block_bytes(t.layout.block_shape) if t.wire == "fp8" else t.layout.block_bytes
        if t.wire_block_bytes != expected:
            raise KVTransferError(
                f"bad ticket: wire block of {t.wire_block_bytes} bytes, {t.wire} blocks of this layout have {expected}"
            )
        if time.time() >= t.expires_at - _safety_margin(t.lease_seconds):
            raise KVTransferError(f"ticket for request {t.request_id!r} has expired (its lease ran out)")
        with self._lock:
            self._check_open()
            self._load_remote(t.agent, t.nixl_md)
            staging_offset = None
            if t.wire == "raw" and t.layout.dtype == self.layout.dtype:
                base = self.kv_cache.data_ptr()
                local_addrs = [base + b * t.wire_block_bytes for b in ids]
            else:
                staging_offset = self._alloc_staging(t.wire_bytes, t.request_id)
                base = self._staging.data_ptr() + staging_offset
                local_addrs = [base + i * t.wire_block_bytes for i in range(len(ids))]
            local_runs, remote_runs, sizes = coalesce_runs(local_addrs, t.addrs, t.wire_block_bytes)
            try:
                xfer = self._nixl.read(local_runs, remote_runs, sizes, (self._mem, self._device_id),
                                       (t.mem, t.device_id), t.agent, t.token)
            except Exception as exc:
                if staging_offset is not None:
                    self._staging_pool.free(staging_offset)
                self._forget_remote(t.agent)
                raise KVTransferError(
                    f"cannot READ request {t.request_id!r} from agent {t.agent!r} (gone, or not its blocks): {exc}"
                ) from None
            handle = PullHandle(t, ids, xfer, staging_offset)
            handle.descriptors = len(sizes)
            self._stats.pulls += 1
            self._stats.descriptors += len(sizes)
            self._pulls[id(handle)] = handle
            return handle

    def check(self, handle: PullHandle) -> str:
        """"PENDING", "DONE" (blocks landed in the cache, exporter notified) or "ERROR" (see
        handle.error). Never blocks."""
        with self._lock:
            if handle.state != "PENDING":
                return handle.state
            try:
                state = self._nixl.state(handle._xfer)
            except Exception as exc:
                state = "ERR"
                log.warning("check_xfer_state for %r raised %s", handle.request_id, exc)
            late = time.time() >= handle._accept_until
            if state == "PROC":
                if late:
                    self._fail(handle, "READ did not complete before the exporter's lease deadline")
            elif state == "ERR":
                self._fail(handle, f"NIXL reported a failed READ from agent {handle.source_agent!r} (gone?)")
                self._forget_remote(handle.source_agent)
            elif late:
                self._fail(handle, "READ completed after the lease deadline; the exporter may have reused the blocks")
            else:
                self._land(handle)
            return handle.state

    def wait(self, handle: PullHandle, timeout: float) -> str:
        """Polls check() until the pull leaves PENDING or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        while (state := self.check(handle)) == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.0005)
        return state

    def abort(self, handle: PullHandle) -> None:
        """Gives up a pending pull (the request was aborted); the exporter releases it "cancelled"."""
        with self._lock:
            if handle.state == "PENDING":
                self._fail(handle, "aborted by the reader")

    @torch.inference_mode()  # the engine's cache may be an inference tensor
    def _land(self, handle: PullHandle) -> None:
        t = handle._ticket
        if handle._staging_offset is not None:
            wire = self._staging_view(handle._staging_offset, t.num_blocks, t.wire_block_bytes)
            if t.wire == "fp8":  # dequantized straight into the blocks (one kernel on CUDA)
                unpack_fp8_into_cache(wire, self.kv_cache, self._index(handle.local_block_ids))
            else:
                blocks = wire.view(t.layout.torch_dtype).view(t.num_blocks, *t.layout.block_shape)
                self.kv_cache.index_copy_(0, self._index(handle.local_block_ids), blocks.to(self.layout.torch_dtype))
            if self.kv_cache.is_cuda:  # the staging range is reused as soon as it is freed
                torch.cuda.current_stream(self.kv_cache.device).synchronize()
        self._finish(handle, "DONE", None)
        self._stats.pulls_done += 1
        self._stats.bytes_received += handle.bytes
        self._stats.transfer_seconds += handle.seconds
        self._stats.record("pull", handle.request_id, "done", handle.bytes, handle.seconds)

    def _fail(self, handle: PullHandle, why: str) -> None:
        released = self._finish(handle, "ERROR", why)
        self._stats.pulls_failed += 1
        self._stats.record("pull", handle.request_id, "error", 0, handle.seconds)
        if released:  # nothing touches the exporter's blocks any more: let it free them now
            try:
                self._nixl.notify(handle.source_agent, _ABORT + handle._ticket.token)
            except Exception:
                pass  # the exporter is gone or unreachable; its lease expires on its own

    def _finish(self, handle: PullHandle, state: str, error: Optional[str]) -> bool:
        """Releases the NIXL request and staging; False if NIXL would not release a live READ."""
        handle.state, handle.error = state, error
        handle.seconds = time.perf_counter() - handle._started
        self._pulls.pop(id(handle), None)
        try:
            self._nixl.release(handle._xfer)
        except Exception:
            # A READ NIXL cannot cancel may still write the staging range: keep both until close().
            self._stuck.append(handle._xfer)
            return False
        if handle._staging_offset is not None:
            self._staging_pool.free(handle._staging_offset)
        handle.settled = True
        return True

    # ---- both sides -----------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            out = self._stats.snapshot()
            out.update(
                agent=self.name,
                wire_dtype=self.wire_dtype,
                active_leases=len(self._leases),
                pending_pulls=len(self._pulls),
                staging_capacity=self._staging_pool.capacity,
                staging_bytes_in_use=self._staging_pool.bytes_in_use,
            )
            return out

    def close(self) -> list:
        """Fails pending pulls, releases every lease as "cancelled" (on_release runs here, since
        poll() will not run again), deregisters the memory and drops the NIXL agent."""
        with self._lock:
            if self._closed:
                return []
            for handle in list(self._pulls.values()):
                self._fail(handle, "agent closed")
            released = [(lease, "cancelled") for lease in self._cancelled + self._leases.pop_all()]
            self._cancelled = []
            for lease, reason in released:
                self._settle(lease, reason)
            self._closed = True
            for xfer in self._stuck:
                try:
                    self._nixl.release(xfer)
                except Exception:
                    log.warning("NIXL transfer %r could not be released at close", xfer)
            for name in list(self._remotes):
                try:
                    self._nixl.remove_remote(name)
                except Exception:
                    pass
            for registration in self._registrations:
                self._nixl.deregister(registration)
            self._remotes.clear()
            self._nixl.close()
        return self._deliver(released)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"agent {self.name!r} is closed")

    def _check_block_ids(self, block_ids: Sequence[int], what: str) -> list:
        ids = [int(b) for b in block_ids]
        if not ids:
            raise KVTransferError(f"{what}: no block ids")
        bad = [b for b in ids if not 0 <= b < self.layout.num_blocks]
        if bad:
            raise KVTransferError(f"{what}: block ids {bad[:8]} outside [0, {self.layout.num_blocks})")
        if len(set(ids)) != len(ids):
            raise KVTransferError(f"{what}: duplicate block ids")
        return ids

    def _index(self, ids: list) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.kv_cache.device)

    def _alloc_staging(self, nbytes: int, request_id: str) -> int:
        if nbytes > self._staging_pool.capacity:
            raise KVTransferError(
                f"request {request_id!r} needs {nbytes} staging bytes, the pool of {self.name!r} has "
                f"{self._staging_pool.capacity}; raise staging_blocks"
            )
        offset = self._staging_pool.alloc(nbytes)
        if offset is None:
            raise KVTransferBusy(f"staging pool of {self.name!r} is full; retry request {request_id!r} later")
        return offset

    def _staging_view(self, offset: int, n: int, wire_block_bytes: int) -> torch.Tensor:
        return self._staging[offset : offset + n * wire_block_bytes].view(n, wire_block_bytes)
