"""What an engine did and when, one JSON line per event (EngineConfig.step_log): the record that the planner's
validation holds the simulator against (benchmarks/step_timeline.py), one file per engine process.

    {"ev": "add", "t": 12.345678, "id": "r-1", "prompt": 2048}
    {"ev": "loaded", "t": 12.35, "id": "r-1"}          (a decode worker: the prompt's KV has landed)
    {"ev": "step", "t": 12.3461, "done": 12.4420, "host_ms": 1.9, "dev_ms": 94.1, "seqs": 3, "tokens": 4096,
     "ctx": 4159, "tok_ctx": 0, "chunks": [["r-1", 2048, 0], ["r-2", 2048, 0]], "first": ["r-1", "r-2"]}

Times are time.perf_counter() (CLOCK_MONOTONIC on Linux, one clock for every process of a host), so they line up
with `pdserve bench --save-outputs`' `sent_clock`. A step's `t` is when the engine began launching it, `done` when
the host saw it complete (under overlap scheduling, in the step() call after), `host_ms` the launch's host time,
`dev_ms` the device time between CUDA events around the launch (None on CPU; on the device a step starts once the
one before has ended, so the sum of dev_ms is the device's busy time). `ctx` and `tok_ctx` are the sums the planner
costs a step with (profile.mixed_ms / decode_ms): cached tokens over all rows, and new x cached tokens per row.
`chunks` are the rows with more than one new token ([id, new tokens, cached before]); `first`, the requests whose
first output token this step samples. Off by default: a step's record costs 13-22 us of host time (batch 4-48, on the
2-core CI box), plus two CUDA events on a GPU.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class StepLog:
    def __init__(self, directory: str, role: str, device: torch.device):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"{role}-{os.getpid()}.jsonl"
        self._f = open(self.path, "a", buffering=1)  # a line at a time: a killed worker keeps what it logged
        self._cuda = device.type == "cuda"

    def request(self, request_id: str, prompt_tokens: int) -> None:
        self._write({"ev": "add", "t": round(time.perf_counter(), 6), "id": request_id, "prompt": prompt_tokens})

    def loaded(self, request_id: str) -> None:
        """A request's prompt KV from another engine has landed; it is scheduled from now on."""
        self._write({"ev": "loaded", "t": round(time.perf_counter(), 6), "id": request_id})

    def launching(self, batch) -> dict:
        """Before the step's launch: its composition, its start (time, CUDA event)."""
        rec = {"ev": "step", "t": time.perf_counter(), "seqs": len(batch.seqs), "tokens": batch.num_tokens,
               "ctx": 0, "tok_ctx": 0, "chunks": [], "first": []}
        for seq, n, r in zip(batch.seqs, batch.num_new, batch.num_refresh):
            cached = seq.num_computed_tokens
            rec["ctx"] += cached
            rec["tok_ctx"] += (n + r) * cached
            if n + r > 1:
                rec["chunks"].append([seq.request_id, n + r, cached])
            if not seq.prefill_only and seq.num_output_tokens == 0 and cached + n == seq.num_tokens:
                rec["first"].append(seq.request_id)
        if self._cuda:
            rec["_events"] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            rec["_events"][0].record()
        return rec

    def launched(self, rec: dict) -> None:
        rec["host_ms"] = round((time.perf_counter() - rec["t"]) * 1e3, 3)
        if self._cuda:
            rec["_events"][1].record()

    def finished(self, rec: dict) -> None:
        """The step is complete on the device (its outputs were read)."""
        events = rec.pop("_events", None)
        if events is not None:
            events[1].synchronize()  # a synchronous step's outputs are read after this: its end is the device's
            rec["dev_ms"] = round(events[0].elapsed_time(events[1]), 3)
        else:
            rec["dev_ms"] = None
        rec["done"] = round(time.perf_counter(), 6)
        rec["t"] = round(rec["t"], 6)
        self._write(rec)

    def _write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._f.close()
