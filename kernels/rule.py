"""The position rule: which cached keys a query reads in full precision, and what a prefix hit recomputes.

The query at position t reads key j <= t exactly (its rotated full-precision copy) iff ``j < sink``
or ``j >= exact_from(t)``, and from its quantized storage row otherwise. With a block rule
(``block`` W > 0, ``recent`` 0) ``exact_from(t) = block_start(t)``: a query reads its own block
exactly and nothing exact before it but the sinks. Blocks are [kW, (k+1)W); below W, with
``first`` F > 0, they double from F instead ([0, F), [F, 2F), ..., [W/2, W)), so a short prefix
keeps fewer full-precision rows. Every block start is a cut: no query at or after it reads an
earlier key exactly (sinks aside), so the full-precision copies of a cached prefix of length m
are rebuilt exactly by recomputing its last ``m - rebuild_start(m)`` tokens from the quantized
rows before them (``rebuildable``). A sliding part (``recent`` R > 0: ``exact_from(t) = t - R + 1``,
alone or with a block, the earlier of the two) has no cuts, so its copies depend on every earlier
exact copy: it is evaluated (``oscar_sglang.eval``) but not served. The default, sink 64 and
blocks of 1024 doubling from 128, is the measured choice (docs/results.md).

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
    first: int = 128  # below ``block`` the blocks double from this size ([0, f), [f, 2f), ..., [block/2, block));
    # 0, or >= block (stored as 0): every block is ``block`` long

    def __post_init__(self):
        if self.sink < 0 or self.block < 0 or self.recent < 0 or self.first < 0 or not (self.block or self.recent):
            raise ValueError(f"a position rule needs sink >= 0 and a block or a recent window > 0, got {self}")
        if self.first >= self.block:
            object.__setattr__(self, "first", 0)
        if self.first and (self.block % self.first or (self.block // self.first).bit_count() != 1):
            raise ValueError(f"the first block ({self.first}) must divide the block ({self.block}) by a power of two")

    @classmethod
    def parse(cls, spec: str, sink: int = 64) -> PositionRule:
        """``block:W``, ``block:W/F`` (blocks doubling from F up to W), ``sliding:R`` or ``block:W+sliding:R``."""
        parts = {}
        for item in spec.split("+"):
            kind, _, n = item.partition(":")
            size, _, first = n.partition("/")
            if kind not in ("block", "sliding") or not size.isdigit() or kind in parts or \
                    (first and (kind != "block" or not first.isdigit())):
                raise ValueError(f"position rule {spec!r}: expected block:W, block:W/F, sliding:R or block:W+sliding:R")
            parts[kind] = (int(size), int(first or 0))
        block, first = parts.get("block", (0, 0))
        return cls(sink=sink, block=block, recent=parts.get("sliding", (0, 0))[0], first=first)

    @property
    def spec(self) -> str:
        """The rule as ``parse`` reads it."""
        block = f"block:{self.block}" + (f"/{self.first}" if self.first else "")
        return "+".join([block] * bool(self.block) + [f"sliding:{self.recent}"] * bool(self.recent))

    @property
    def name(self) -> str:
        return self.spec.replace(":", "")

    @property
    def rebuildable(self) -> bool:
        """Whether a cached prefix's full-precision copies can be rebuilt from its quantized rows."""
        return self.block > 0 and self.recent == 0

    def block_start(self, t):
        """The start of the block position ``t`` (int or int64 tensor) is in."""
        start = t // self.block * self.block
        if not self.first:
            return start
        if not hasattr(t, "where"):
            return start if t >= self.block else (0 if t < self.first else self.first << ((t // self.first).bit_length() - 1))
        doubled = self.first * 2 ** (t // self.first).clamp(min=1).double().log2().floor().long()
        return start.where(t >= self.block, doubled.where(t >= self.first, 0))

    def exact_from(self, t):
        """First non-sink key position the query at ``t`` (int or int64 tensor) reads exactly."""
        ends = []
        if self.block:
            ends.append(self.block_start(t))
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
        return self.block_start(m)

    def window(self, n: int) -> tuple[range, range]:
        """Positions < n that a query at position n reads exactly: (sinks, the block part)."""
        return range(min(self.sink, n)), range(max(self.sink, self.exact_from(n)), n)
