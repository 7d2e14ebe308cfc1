"""Soak: a real local cluster (`pdserve serve`, one prefill and one decode worker, the embedded model) under mixed
load for N minutes while the RSS of the router and of every worker process is sampled; writes the growth of each
after the warm-up as JSON and markdown (pdserve/testing/soak.py says what the load is and when growth fails).

    .venv/bin/python -P benchmarks/soak.py --minutes 30 --out soak.json --md soak.md

Exit status 1 when a process grew past the limit or a request had an unexpected outcome.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from pdserve.testing.cluster import Server
from pdserve.testing.soak import CONFIG, GrowthRule, markdown, run_soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("PDSERVE_SOAK_MINUTES", 30)))
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: min(5, minutes / 3)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between two RSS samples")
    ap.add_argument("--clients", type=int, default=4, help="client threads, each with one request at a time")
    ap.add_argument("--limit-mb-per-hour", type=float, default=GrowthRule.limit_mb_per_hour)
    ap.add_argument("--floor-mb", type=float, default=GrowthRule.floor_mb)
    ap.add_argument("--out", type=Path, help="the report as JSON (with every RSS sample)")
    ap.add_argument("--md", type=Path, help="the summary as markdown")
    args = ap.parse_args()
    rule = GrowthRule(args.limit_mb_per_hour, args.floor_mb)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(CONFIG, Path(tmp))
        try:
            rep = run_soak(server, args.minutes, args.warmup_minutes, args.sample_s, args.clients, rule=rule)
        finally:
            server.stop()
    text = markdown(rep)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(rep, indent=1))
    if args.md:
        args.md.write_text(text + "\n")
    return 1 if rep["over_limit"] or rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
