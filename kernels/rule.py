"""The position rule: which cached keys a query reads in full precision, and what a prefix hit recomputes.

The query at position t reads key j <= t exactly (its rotated full-precision copy) iff ``j < sink``
or ``j >= exact_from(t)``, and from its quantized storage row otherwise. With the block rule
(``block`` W > 0, ``recent`` 0) ``exact_from(t) = floor(t / W) * W``: a query reads its own
W-block exactly and nothing exact before it but the sinks. Every block start is then a cut: no
query at or after it reads an earlier key exactly (sinks aside), so the full-precision copies of
a cached prefix of length m are rebuilt exactly by recomputing its last ``m - rebuild_start(m)``
tokens from the quantized rows before them (``rebuildable``). A sliding part (``recent`` R > 0:
``exact_from(t) = t - R + 1``, alone or with a block, the earlier of the two) has no cuts, so its
copies depend on every earlier exact copy: it is evaluated (``oscar_sglang.eval``) but not served.

The rule depends on positions only, so the quantized model is one function of the token
sequence: cached == uncached, any chunking == any other, batched == alone. Pure python (its
methods take ints or torch tensors): the serving backend, the kernels' references, calibration and
the evaluation all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PositionRule"]


@dataclass(frozen=True)
class PositionRule:
    sink: int = 64
    block: int = 1024  # 0: no block part
    recent: int = 0  # 0: no sliding part

    def __post_init__(self):
        if self.sink < 0 or self.block < 0 or self.recent < 0 or not (self.block or self.recent):
            raise ValueError(f"a position rule needs sink >= 0 and a block or a recent window > 0, got {self}")

    @classmethod
    def parse(cls, spec: str, sink: int = 64) -> PositionRule:
        """``block:W``, ``sliding:R`` or ``block:W+sliding:R``."""
        parts = {}
        for item in spec.split("+"):
            kind, _, n = item.partition(":")
            if kind not in ("block", "sliding") or not n.isdigit() or kind in parts:
                raise ValueError(f"position rule {spec!r}: expected block:W, sliding:R or block:W+sliding:R")
            parts[kind] = int(n)
        return cls(sink=sink, block=parts.get("block", 0), recent=parts.get("sliding", 0))

    @property
    def name(self) -> str:
        return "+".join([f"block{self.block}"] * bool(self.block) + [f"sliding{self.recent}"] * bool(self.recent))

    @property
    def rebuildable(self) -> bool:
        """Whether a cached prefix's full-precision copies can be rebuilt from its quantized rows."""
        return self.block > 0 and self.recent == 0

    def exact_from(self, t):
        """First non-sink key position the query at ``t`` (int or int64 tensor) reads exactly."""
        ends = []
        if self.block:
            ends.append(t // self.block * self.block)
        if self.recent:
            ends.append(t - self.recent + 1)
        if len(ends) == 1:
            return ends[0]
        return ends[0].minimum(ends[1]) if hasattr(t, "minimum") else min(ends)

    def exact(self, t, j):
        """bool: query at ``t`` reads key ``j`` (broadcast) exactly; keys after t are not read at all."""
        return (j <= t) & ((j < self.sink) | (j >= self.exact_from(t)))

    def rebuild_start(self, m: int) -> int:
        """Block rule: a query at or after position m reads exactly, of keys before m, the sinks and
        [max(sink, rebuild_start(m)), m): a prefix hit of m tokens recomputes the tokens from
        ``rebuild_start(m)`` on unless those copies are still held."""
        if not self.rebuildable:
            raise ValueError(f"{self.name} has no rebuild point: a sliding window's copies cannot be rebuilt")
        return m // self.block * self.block

    def window(self, n: int) -> tuple[range, range]:
        """Positions < n that a query at position n reads exactly: (sinks, the block part)."""
        return range(min(self.sink, n)), range(max(self.sink, self.exact_from(n)), n)
