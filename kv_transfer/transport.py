"""One NIXL agent with its UCX backend: the few operations the KV transfer needs.

Why not nixl's Python `nixl_agent`: it hard-codes pthrDelay = 0, and the UCX backend's progress
thread then poll()s its workers with a zero timeout, a full CPU core per agent even when idle
(measured here: 1.0 core per agent, and READs of 1 MiB slowed to ~4 ms on a 2-core host). With
pthrDelay = 1000 us the thread sleeps in poll() until UCX signals (or 1 ms passes): ~0.03 core
idle, 0.2 ms per 1 MiB READ. So the agent is built from the same bindings `nixl_agent` wraps.

A progress thread is needed at all because, over UCX's TCP/shared-memory transports, a READ
only completes while the exporting side progresses its worker; without one the exporter would
have to call poll() throughout every transfer.

No UCX_* variable is set here: UCX's defaults work for agents in one process and across
processes of one host (checked with the tests); UCX_TLS=sm,self alone fails on this host ("no
active messages transport ... no peer failure handler"), so never narrow it to that.
"""
import importlib

import numpy as np

from .errors import KVTransferError

_CANDIDATES = ("nixl._api", "nixl_cu12._api")  # the `nixl` meta package, then the CUDA-12 wheel
PROGRESS_DELAY_US = 1000


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
        "NIXL is not installed, so KV blocks cannot be transferred: pip install nixl-cu12 "
        "(or the `nixl` meta package; it is in pdserve's [cluster] extra). "
        "Import attempts: " + "; ".join(reasons)
    )


class NixlTransport:
    """Not thread-safe by itself (the agent is created unsynchronized); callers serialize."""

    def __init__(self, name: str):
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
            self._agent.createBackend("UCX", {})
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

    def read(self, local_addrs, remote_addrs, nbytes: int, local_mem: tuple, remote_mem: tuple,
             remote: str, notification: bytes) -> int:
        """Posts one READ of len(addrs) descriptors of nbytes each; returns its request handle.
        The remote agent receives `notification` once the whole READ has completed."""
        local = self._descs(local_addrs, nbytes, *local_mem)
        remote_descs = self._descs(remote_addrs, nbytes, *remote_mem)
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

    def _descs(self, addrs, nbytes: int, mem: str, device_id: int):
        table = np.empty((len(addrs), 3), dtype=np.uint64)
        table[:, 0] = addrs
        table[:, 1] = nbytes
        table[:, 2] = device_id
        return self._nixl.nixlXferDList(self._mem[mem], table)
