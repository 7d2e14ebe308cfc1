"""Byte ranges of a registered staging buffer, handed out first-fit.

Pure Python over ints: the agent owns the tensor, this only decides offsets. A request
gets one contiguous range so its staged blocks form one [n, wire_block_bytes] view.
"""
from typing import Optional

ALIGN = 64  # keeps every range fp32/cache-line aligned


class StagingPool:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = [(0, capacity)] if capacity > 0 else []  # sorted, coalesced (offset, size)
        self._used = {}  # offset -> size

    @property
    def bytes_in_use(self) -> int:
        return sum(self._used.values())

    def alloc(self, size: int) -> Optional[int]:
        """Returns the offset of `size` free bytes, or None when no hole is large enough."""
        size = (size + ALIGN - 1) // ALIGN * ALIGN
        for i, (offset, hole) in enumerate(self._free):
            if hole >= size:
                if hole == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, hole - size)
                self._used[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        self._free.append((offset, size))
        self._free.sort()
        merged = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged
