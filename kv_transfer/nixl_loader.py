"""Finds the NIXL Python API, or says clearly that it is missing.

The `nixl` meta package exposes `nixl._api`; the CUDA-12 wheel alone installs it as
`nixl_cu12._api`. No other transport is substituted when neither imports.
"""
import importlib

_CANDIDATES = ("nixl._api", "nixl_cu12._api")


def load_nixl():
    """Returns (nixl_agent, nixl_agent_config) or raises KVTransferError naming the fix."""
    from .errors import KVTransferError

    reasons = []
    for module_name in _CANDIDATES:
        try:
            module = importlib.import_module(module_name)
            return module.nixl_agent, module.nixl_agent_config
        except ImportError as exc:
            reasons.append(f"{module_name}: {exc}")
    raise KVTransferError(
        "NIXL is not installed, so KV blocks cannot be transferred: pip install nixl-cu12 "
        "(or the `nixl` meta package; it is in pdserve's [cluster] extra). "
        "Import attempts: " + "; ".join(reasons)
    )
