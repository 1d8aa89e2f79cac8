"""The position rule (kernels/rule.py): which keys a query reads in full precision, checked against
its definition (the query at t reads key j <= t exactly iff j < sink or j >= exact_from(t), with
exact_from(t) = t // W * W for a block W, t - R + 1 for a sliding window R, the earlier of the two
for both), the cut property the block rule is served on, and the spec parser."""

from __future__ import annotations

import re

import pytest
import torch

from oscar_sglang.kernels.rule import PositionRule


def definition(sink: int, block: int, recent: int, t: int, j: int) -> bool:
    """Key j exact for the query at t, written out from the rule's docstring."""
    ends = ([t // block * block] if block else []) + ([t - recent + 1] if recent else [])
    return j <= t and (j < sink or j >= min(ends))


def test_block_rule_at_block_boundaries_and_sinks():
    r = PositionRule(sink=4, block=8)
    exact = lambda t: [j for j in range(t + 1) if r.exact(t, j)]  # noqa: E731
    assert exact(7) == list(range(8))  # the first block: everything (sinks included) is exact
    assert exact(8) == [0, 1, 2, 3, 8]  # a block start: the sinks and itself; 4..7 are read quantized
    assert exact(15) == [0, 1, 2, 3, *range(8, 16)]  # the block's last query: its whole block
    assert exact(16) == [0, 1, 2, 3, 16]
    assert [r.exact_from(t) for t in (0, 7, 8, 15, 16, 23, 24)] == [0, 0, 8, 8, 16, 16, 24]
    assert not r.exact(2, 3) and not r.exact(9, 10)  # keys after the query are not read at all, sinks neither
    # sinks longer than a block: the sinks stay exact, the block part starts at the query's block
    s = PositionRule(sink=10, block=4)
    assert [j for j in range(13) if s.exact(12, j)] == [*range(10), 12]
    assert [j for j in range(12) if s.exact(11, j)] == [*range(12)]  # block [8, 12) overlaps the sinks
    assert [j for j in range(3) if PositionRule(sink=0, block=2).exact(2, j)] == [2]  # no sinks


@pytest.mark.parametrize("sink,block,recent", [(4, 8, 0), (10, 4, 0), (0, 3, 0), (3, 0, 5), (2, 8, 3), (2, 4, 9)])
def test_exact_matches_the_definition_for_ints_and_tensors(sink, block, recent):
    r = PositionRule(sink=sink, block=block, recent=recent)
    n = 40
    want = torch.tensor([[definition(sink, block, recent, t, j) for j in range(n)] for t in range(n)])
    t, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(r.exact(t, j), want)  # broadcast over int64 tensors (the calibration's masks)
    assert [[r.exact(a, b) for b in range(n)] for a in range(n)] == want.tolist()  # python ints (the backend)
    assert r.exact_from(torch.arange(n)).tolist() == [r.exact_from(a) for a in range(n)]


@pytest.mark.parametrize("sink,block", [(4, 8), (10, 4), (0, 3), (5, 5), (1, 1)])
def test_window_is_what_the_query_at_n_reads_exactly(sink, block):
    r = PositionRule(sink=sink, block=block)
    for n in range(40):
        sinks, part = r.window(n)
        assert sinks == range(min(sink, n)) and part.start >= sinks.stop and part.stop == n
        assert [*sinks, *part] == [j for j in range(n) if r.exact(n, j)]
    assert PositionRule(sink=4, block=8).window(12) == (range(4), range(8, 12))
    assert PositionRule(sink=4, block=8).window(3) == (range(3), range(4, 3))  # empty block part
    assert PositionRule(sink=10, block=4).window(13) == (range(10), range(12, 13))


@pytest.mark.parametrize("sink", [0, 1, 3, 5, 9])
@pytest.mark.parametrize("block", [1, 2, 3, 4, 8])
def test_every_block_start_is_a_cut(sink, block):
    """No query at or after a block start s reads a non-sink key before s exactly, so a cached prefix
    of m tokens is rebuilt by recomputing the tokens from rebuild_start(m) on (checked exhaustively)."""
    r = PositionRule(sink=sink, block=block)
    n = 4 * block + sink + 3
    for s in range(block, n, block):
        assert not any(r.exact(t, j) for t in range(s, n) for j in range(sink, s))
    for m in range(n):
        start = r.rebuild_start(m)
        assert start == m // block * block and start <= m < start + block
        allowed = set(range(min(sink, m))) | set(range(max(sink, start), m))
        for t in range(m, n):
            assert {j for j in range(m) if r.exact(t, j)} <= allowed
        assert {j for j in range(m) if r.exact(m, j)} == allowed  # the query at m reads all of it
    # a sliding window has no cut: each of its exact keys is read by a query past any later position
    slide = PositionRule(sink=sink, block=0, recent=block + 1)
    assert all(any(slide.exact(s, j) for j in range(sink, s)) for s in range(sink + 1, n))


def test_rebuildable_only_without_a_sliding_part():
    assert PositionRule(sink=4, block=8).rebuildable and PositionRule().rebuildable
    assert PositionRule().rebuild_start(2500) == 2048
    assert [PositionRule(sink=4, block=8).rebuild_start(m) for m in (0, 7, 8, 9, 16, 17)] == [0, 0, 8, 8, 16, 16]
    for r in (PositionRule(sink=4, block=0, recent=8), PositionRule(sink=4, block=8, recent=3)):
        assert not r.rebuildable
        with pytest.raises(ValueError, match=re.escape(f"{r.name} has no rebuild point")):
            r.rebuild_start(16)


def test_parse_and_name():
    assert PositionRule() == PositionRule(sink=64, block=1024, recent=0, first=128)
    assert PositionRule.parse(PositionRule().spec) == PositionRule() and PositionRule().name == "block1024/128"
    assert PositionRule.parse("block:1024") == PositionRule(sink=64, block=1024, first=0)
    assert PositionRule(sink=4, block=8) == PositionRule(sink=4, block=8, first=0)  # a first block >= block: uniform
    assert PositionRule.parse("sliding:256", sink=4) == PositionRule(sink=4, block=0, recent=256)
    both = PositionRule.parse("block:512+sliding:128", sink=0)
    assert both == PositionRule.parse("sliding:128+block:512", sink=0) == PositionRule(sink=0, block=512, recent=128, first=0)
    assert [PositionRule.parse(s).name for s in ("block:8", "sliding:4", "sliding:4+block:8")] == \
        ["block8", "sliding4", "block8+sliding4"]
    for bad in ("", "block", "block:", "block:x", "block:-8", "blocks:8", "block:8+block:16", "block:8,sliding:4"):
        with pytest.raises(ValueError, match="expected block:W, block:W/F, sliding:R or block:W\\+sliding:R"):
            PositionRule.parse(bad)
    for bad in (dict(block=0), dict(block=0, recent=0), dict(sink=-1), dict(block=-8), dict(recent=-1)):
        with pytest.raises(ValueError, match="a position rule needs sink >= 0 and a block or a recent window > 0"):
            PositionRule(**bad)
    with pytest.raises(ValueError, match="a position rule needs"):
        PositionRule.parse("block:0")


def test_blocks_double_from_the_first_block_up_to_the_block():
    r = PositionRule(sink=64, block=1024, first=128)
    starts = [r.block_start(t) for t in (0, 127, 128, 255, 256, 511, 512, 1023, 1024, 2047, 2048)]
    assert starts == [0, 0, 128, 128, 256, 256, 512, 512, 1024, 1024, 2048]
    t = torch.arange(5000)
    assert r.block_start(t).tolist() == [r.block_start(int(x)) for x in t]
    assert [r.rebuild_start(m) for m in (100, 300, 700, 1500)] == [0, 256, 512, 1024]  # short prefixes rebuild little
    assert r.window(300) == (range(64), range(256, 300))
    for bad in (dict(block=1024, first=384), dict(block=96, first=64)):
        with pytest.raises(ValueError, match="must divide the block"):
            PositionRule(**bad)
    assert PositionRule.parse("block:16/4", sink=2) == PositionRule(sink=2, block=16, first=4)
