"""One NIXL agent with its UCX backend: the few operations the KV transfer needs.

Why not nixl's Python `nixl_agent`: it hard-codes pthrDelay = 0, and the UCX backend's progress
thread then poll()s its workers with a zero timeout, a full CPU core per agent even when idle
(measured here: 1.0 core per agent, and READs of 1 MiB slowed to ~4 ms on a 2-core host). With
pthrDelay = 1000 us the thread sleeps in poll() until UCX signals (or 1 ms passes): ~0.03 core
idle, 0.2 ms per 1 MiB READ. So the agent is built from the same bindings `nixl_agent` wraps.

A progress thread is needed at all because, over UCX's TCP/shared-memory transports, a READ
only completes while the exporting side progresses its worker; without one the exporter would
have to call poll() throughout every transfer.

UCX settings go through the backend's `engine_config` (NIXL applies them to this agent's UCX
context only, and a UCX_* variable in the environment still wins), never through os.environ:
- CUDA_IPC_ENABLE_GET_ZCOPY=y. UCX's cuda_ipc transport offers zero-copy GET only when NVML reports
  NVLinks on GPU 0 ("auto": GET over PCIe is slower on some platforms). With one GPU there are
  none, so a READ of VRAM fell back to a host-staged pipeline: 0.41 GB/s between two processes on
  one H200, against 165-195 GB/s with GET enabled (BENCHMARKS.md). Between GPUs of one host the
  copy engines do the same work either way, and a pull (READ) is the only way pdserve moves KV.
- Nothing else: UCX's defaults work for agents in one process and across processes of one host
  (checked with the tests); UCX_TLS=sm,self alone fails on a CPU host ("no active messages
  transport ... no peer failure handler"), so never narrow it to that.
"""
import importlib

import numpy as np

from .errors import KVTransferError

# the `nixl` meta package, then the CUDA-13 and CUDA-12 wheels (the meta package resolves to one of them)
_CANDIDATES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")
PROGRESS_DELAY_US = 1000
UCX_ENGINE_CONFIG = {"CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def coalesce_runs(local_addrs, remote_addrs, nbytes: int) -> tuple[list, list, list]:
    """Merges descriptor pairs that continue each other on both sides into one descriptor.

    One descriptor per block costs UCX's per-operation overhead (a copy launch and an event per
    block: ~13 us for a 2 MiB block on an H200, where the copy itself takes ~1.3 us); a run of
    blocks adjacent in both caches is one copy. The block manager hands out freed blocks in the
    order they were freed, so a request's block table is mostly a few long runs.
    Returns (local addrs, remote addrs, sizes) of the runs, in order."""
    locs, rems, sizes = [], [], []
    for la, ra in zip(local_addrs, remote_addrs):
        if sizes and locs[-1] + sizes[-1] == la and rems[-1] + sizes[-1] == ra:
            sizes[-1] += nbytes
        else:
            locs.append(la)
            rems.append(ra)
            sizes.append(nbytes)
    return locs, rems, sizes


def load_nixl_bindings():
    """The NIXL bindings module, or KVTransferError naming the fix. Nothing is substituted."""
    reasons = []
    for module_name in _CANDIDATES:
        try:
            return importlib.import_module(module_name).nixlBind
        except ImportError as exc:
            reasons.append(f"{module_name}: {exc}")
        except AttributeError as exc:
            reasons.append(f"{module_name}: unexpected NIXL version ({exc})")
    raise KVTransferError(
        "NIXL is not installed, so KV blocks cannot be transferred: pip install nixl-cu12 or nixl-cu13 "
        "(or the `nixl` meta package; it is in pdserve's [cluster] extra). "
        "Import attempts: " + "; ".join(reasons)
    )


class NixlTransport:
    """Not thread-safe by itself (the agent is created unsynchronized); callers serialize."""

    def __init__(self, name: str, backend_params: dict | None = None):
        """backend_params: extra NIXL UCX backend parameters (num_threads, split_batch_size, ...)."""
        nixl = load_nixl_bindings()
        self._nixl = nixl
        config = nixl.nixlAgentConfig()
        config.useProgThread = True
        config.useListenThread = False  # metadata travels in our msgpack tickets instead
        config.pthrDelay = PROGRESS_DELAY_US
        config.syncMode = nixl.NIXL_THREAD_SYNC_NONE
        try:
            self._agent = nixl.nixlAgent(name, config)
            if "UCX" not in self._agent.getAvailPlugins():
                raise KVTransferError("NIXL is installed but its UCX plugin is missing")
            engine_config = ",".join(f"{k}={v}" for k, v in UCX_ENGINE_CONFIG.items())
            self._agent.createBackend("UCX", {"engine_config": engine_config, **(backend_params or {})})
        except KVTransferError:
            raise
        except Exception as exc:
            raise KVTransferError(f"cannot create NIXL agent {name!r} with a UCX backend: {exc}") from exc
        self._mem = {"DRAM": nixl.DRAM_SEG, "VRAM": nixl.VRAM_SEG}
        self._states = {nixl.NIXL_SUCCESS: "DONE", nixl.NIXL_IN_PROG: "PROC"}

    def register(self, addr: int, nbytes: int, mem: str, device_id: int):
        regs = self._nixl.nixlRegDList(self._mem[mem], [(addr, nbytes, device_id, "")])
        self._agent.registerMem(regs, [])
        return regs

    def deregister(self, regs) -> None:
        self._agent.deregisterMem(regs, [])

    def metadata(self) -> bytes:
        return self._agent.getLocalMD()

    def load_remote(self, metadata: bytes) -> str:
        name = self._agent.loadRemoteMD(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def remove_remote(self, name: str) -> None:
        self._agent.invalidateRemoteMD(name)

    def read(self, local_addrs, remote_addrs, sizes, local_mem: tuple, remote_mem: tuple,
             remote: str, notification: bytes) -> int:
        """Posts one READ of len(addrs) descriptors (sizes[i] bytes each); returns its request handle.
        The remote agent receives `notification` once the whole READ has completed."""
        local = self._descs(local_addrs, sizes, *local_mem)
        remote_descs = self._descs(remote_addrs, sizes, *remote_mem)
        handle = self._agent.createXferReq(self._nixl.NIXL_READ, local, remote_descs, remote, notification, [])
        if self._agent.postXferReq(handle, notification) not in self._states:
            self._agent.releaseXferReq(handle)
            raise KVTransferError("NIXL refused to post the READ")
        return handle

    def state(self, handle: int) -> str:
        """"DONE", "PROC" (in progress) or "ERR"."""
        return self._states.get(self._agent.getXferStatus(handle), "ERR")

    def release(self, handle: int) -> None:
        """Frees a request; NIXL cancels it if still running, or raises if it cannot."""
        self._agent.releaseXferReq(handle)

    def notifications(self) -> dict:
        """{remote agent name: [message bytes, ...]} received since the last call."""
        return self._agent.getNotifs({}, [])

    def notify(self, remote: str, message: bytes) -> None:
        self._agent.genNotif(remote, message)

    def close(self) -> None:
        self._agent = None  # the bindings' destructor stops the progress thread and UCX

    def _descs(self, addrs, sizes, mem: str, device_id: int):
        table = np.empty((len(addrs), 3), dtype=np.uint64)
        table[:, 0] = addrs
        table[:, 1] = sizes
        table[:, 2] = device_id
        return self._nixl.nixlXferDList(self._mem[mem], table)
