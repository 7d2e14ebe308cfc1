"""The soak (slow: PDSERVE_SLOW=1 or -m slow): a real cluster under mixed load for PDSERVE_SOAK_MINUTES (default
30), the RSS of the router and of every worker sampled; no request with an unexpected outcome, no worker lost, and
no process growing past the limit after the warm-up (pdserve/testing/soak.py, GrowthRule, says why that limit).
benchmarks/soak.py runs the same and writes the report."""
from __future__ import annotations

import os

import pytest

from pdserve.testing.cluster import Server
from pdserve.testing.soak import CONFIG, markdown, run_soak

MINUTES = float(os.environ.get("PDSERVE_SOAK_MINUTES", 30))


@pytest.mark.slow
@pytest.mark.timeout(int(MINUTES * 60) + 900)
def test_soak_memory_stays_flat_under_mixed_load(tmp_path):
    server = Server(CONFIG, tmp_path)
    try:
        rep = run_soak(server, MINUTES)
    finally:
        server.stop()
    print("\n" + markdown(rep))
    assert not rep["errors"], rep["errors"][:5]
    assert not rep["processes_gone"], rep["processes_gone"]
    assert all(rep["outcomes"].get(k) for k in ("grpc_stream", "http_stream", "grpc_abort", "http_hangup")), \
        rep["outcomes"]
    assert len(rep["rss"]) == 3, rep["rss"].keys()  # the router, the prefill and the decode worker
    assert not rep["over_limit"], {n: rep["rss"][n] for n in rep["over_limit"]}
