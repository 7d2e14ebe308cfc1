"""Errors raised by the KV transfer layer."""


class KVTransferError(RuntimeError):
    """A transfer cannot be set up or did not complete: bad ticket, mismatched layout,
    remote agent gone, NIXL missing or failing."""


class KVTransferBusy(KVTransferError):
    """A resource is momentarily exhausted (the staging pool is full); retrying later can succeed."""
