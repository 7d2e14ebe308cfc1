"""A router restarted on a Ray cluster it joined adopts the running workers and rebuilds its block
index from their snapshots, so prefix hits come back at once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pdserve.testing.cluster import NEUTRAL_CWD, Server, free_port, stop_session

BENCH = ["--workload", "shared-prefix", "--num-prefixes", "4", "--users-per-prefix", "3", "--prefix-len", "128",
         "--suffix-len", "8", "--max-tokens", "2", "--concurrency", "2", "--seed", "5", "--no-progress"]


def _bench(address):
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--server", address, "--json", *BENCH],
                       capture_output=True, text=True, cwd=NEUTRAL_CWD, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_restarted_router_rebuilds_its_index(tmp_path):
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # a test cluster on loopback: no token (the driver side runs with auth disabled too)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            stdout=open(tmp_path / "ray.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        log_path = tmp_path / "ray.log"
        while "Ray runtime started" not in log_path.read_text():
            assert time.time() < deadline and head.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        address = re.search(r"ray start --address='([^']+)'", log_path.read_text()).group(1)
        cfg = {"model": {"dtype": "float32"}, "engine": {"kv_cache_memory_gb": 0.2},
               "prefill": {"replicas": 2, "num_cpus": 0.5}, "decode": {"replicas": 1, "num_cpus": 0.5},
               "ray": {"address": address}}
        first = Server(cfg, tmp_path)
        try:
            cold = _bench(first.address)
        finally:
            first.stop()
        second = Server(cfg, tmp_path)  # adopts the workers, snapshots their caches
        try:
            log = second.log_path.read_text()
            warm = _bench(second.address)
        finally:
            second.stop()
        print(f"\nhit rate before restart {cold['prefix_hit_rate']:.3f} (oracle {cold['oracle_hit_rate']:.3f}), "
              f"after restart {warm['prefix_hit_rate']:.3f}")
        assert cold["failed"] == 0 and warm["failed"] == 0
        assert "adopted 2 prefill and 1 decode workers" in log
        # every prefix is cached somewhere and the router knows where: all but the last partial block hit
        full_blocks = 128 // 16 * 16
        assert warm["cached_tokens"] >= full_blocks * warm["num_requests"]
        assert warm["prefix_hit_rate"] > cold["prefix_hit_rate"]
    finally:  # this Ray cluster only (never `ray stop`, which would take every Ray on the machine): `ray start`
        # by its pid, then what is left of the process group of its own session
        stop_session(head, timeout=20)
