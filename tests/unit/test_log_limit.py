"""Repeated warnings are rate-limited per key, and the next one written says how many were dropped."""
from __future__ import annotations

import logging

from pdserve.router.log_limit import LogLimiter


def test_one_record_per_key_per_period(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pdserve.router.log_limit.time.monotonic", lambda: now[0])
    lim = LogLimiter(logging.getLogger("test.limit"), period_s=30.0)
    with caplog.at_level(logging.WARNING, logger="test.limit"):
        assert lim.warning("w1", "worker %s is not answering", "w1")
        for _ in range(59):  # two a second for 30 s: what a dead worker used to write
            now[0] += 0.5
            assert not lim.warning("w1", "worker %s is not answering", "w1")
        assert lim.warning("w2", "worker %s is not answering", "w2")  # another key is its own
        now[0] += 0.5
        assert lim.warning("w1", "worker %s is not answering", "w1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["worker w1 is not answering", "worker w2 is not answering",
                     "worker w1 is not answering (59 more like it in the last 30 s)"]
