"""The errors every layer may raise or map, and the CLI's exit codes: a leaf module that imports nothing.

How each surfaces: InvalidRequest -> INVALID_ARGUMENT / exit 2; NoFreeBlocks -> RESOURCE_EXHAUSTED;
NoReadyWorker -> UNAVAILABLE; KVTransferFailed -> retried by the router; ModelLoadError -> exit 3; PoolStartFailed ->
exit 4; CLIError carries its own exit code."""
from __future__ import annotations

EXIT_BAD_INPUT, EXIT_MODEL, EXIT_SERVER = 2, 3, 4


class InvalidRequest(ValueError):
    """Bad user input: maps to INVALID_ARGUMENT over gRPC and exit code 2 in the CLI."""


class NoFreeBlocks(RuntimeError):
    """The KV pool (or the router's queue) has no room for the request now: RESOURCE_EXHAUSTED."""


class NoReadyWorker(RuntimeError):
    """A pool has no ready worker to take the request: UNAVAILABLE."""


class KVTransferFailed(RuntimeError):
    """A prompt's KV could not be moved (the peer died, the lease expired, a transport error): the router
    prefills the request again rather than failing it."""


class ModelLoadError(RuntimeError):
    """The model path is missing, unreadable or not a supported checkpoint."""


class PoolStartFailed(RuntimeError):
    """At start-up, a pool the cluster serves with got no ready worker: every one of its workers failed to start
    (out of GPU memory, say) or was not placed in time. The server stops rather than announce itself ready."""


class CLIError(Exception):
    """A CLI failure reported as one line and an exit code."""

    def __init__(self, msg: str, code: int = EXIT_BAD_INPUT):
        super().__init__(msg)
        self.code = code
