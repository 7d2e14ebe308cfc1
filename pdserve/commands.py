"""Cluster-side subcommands (serve, eval, bench, scale) register here as they land."""
from __future__ import annotations


def register(sub) -> None:
    pass
