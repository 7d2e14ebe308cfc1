"""Rate-limited logging: a dead or stalled worker, or a burst of failing requests, must not write a line
per probe or per request. One record per key per period; the next one says how many were dropped."""
from __future__ import annotations

import logging
import time


class LogLimiter:
    def __init__(self, logger: logging.Logger, period_s: float = 30.0, max_keys: int = 10_000):
        self.logger = logger
        self.period_s = period_s
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time of the last record, records dropped since)

    def log(self, level: int, key: str, msg: str, *args) -> bool:
        """Log `msg % args` unless `key` was logged less than `period_s` ago; True if it was written."""
        now = time.monotonic()
        last, dropped = self._last.get(key, (None, 0))
        if last is not None and now - last < self.period_s:
            self._last[key] = (last, dropped + 1)
            return False
        if dropped:
            msg += f" ({dropped} more like it in the last {now - last:.0f} s)"
        if len(self._last) >= self.max_keys and key not in self._last:
            self._last.pop(next(iter(self._last)))  # oldest first: dicts keep insertion order
        self._last[key] = (now, 0)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
