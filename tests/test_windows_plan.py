"""Window sizing (``oscar_sglang.windows``) and the capacity it leaves, on real sglang sizing.

The engine check starts sglang twice (BF16 and --oscar, default flags, Qwen3-8B attention
geometry with dummy weights) at one ``--mem-fraction-static`` giving a ~2 GiB KV budget; the
card-class rows use the same arithmetic (benchmarks/capacity.py) for budgets this machine cannot
allocate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from oscar_sglang.settings import OscarError
from oscar_sglang.windows import MAX_DERIVED_RUNNING, WINDOW_SHARE, plan_windows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import capacity  # noqa: E402

QWEN3_8B = dict(sink=64, recent=256, head_dim=128, kv_heads=8, layers=36, itemsize=2)


def test_derived_windows_take_a_bounded_share_and_explicit_ones_exactly_what_they_need():
    for gib in (2, 4, 50, 100):
        plan = plan_windows(**QWEN3_8B, budget_bytes=gib * 2**30, max_running_requests=None)
        assert plan.total_bytes <= WINDOW_SHARE * gib * 2**30 or plan.max_running_requests == 1
        assert 1 <= plan.max_running_requests <= MAX_DERIVED_RUNNING
    small, big = (plan_windows(**QWEN3_8B, budget_bytes=b * 2**30, max_running_requests=None) for b in (2, 100))
    assert small.max_running_requests < big.max_running_requests == MAX_DERIVED_RUNNING
    exact = plan_windows(**QWEN3_8B, budget_bytes=100 * 2**30, max_running_requests=200)
    assert exact.request_rows == 201  # sglang's request table: max_running_requests + 1 rows
    with pytest.raises(OscarError, match="lower --max-running-requests"):
        plan_windows(**QWEN3_8B, budget_bytes=2 * 2**30, max_running_requests=200)
    with pytest.raises(OscarError, match="raise --mem-fraction-static"):
        plan_windows(**QWEN3_8B, budget_bytes=50 * 2**20, max_running_requests=None)


@pytest.mark.parametrize("bits,floor,h200", [((2, 2), 6.0, 6.8), ((3, 2), 5.0, 5.5)])
def test_card_classes_keep_about_seven_times_the_tokens(bits, floor, h200):
    """Pure INT2 (the maximum-capacity mode) keeps about 7x the BF16 tokens on every card class;
    the K3V2 default (2.75 physical bits per element at D=128) keeps over 5x."""
    rows = {(r["card"], r["shape"]): r for r in capacity.card_rows(bits)}
    assert rows["141 GB (H200)", "qwen3-8b"]["ratio"] >= h200  # a ~100 GB budget
    for (card, shape), r in rows.items():
        if r["bf16_tokens"]:
            assert r["ratio"] >= floor, (card, shape, r)


def test_sglang_sizes_six_times_the_bf16_tokens_in_two_gib_with_default_flags():
    row = capacity.engine_row("qwen3-8b", "cpu", 2 * 2**30)
    print(row)
    assert 1.6 <= row["kv_budget_gib"] <= 2.4, row
    assert row["ratio"] >= 6.0, row
    # the budget is inferred from the BF16 start; CPU free memory moves a little between starts
    assert abs(row["oscar_tokens"] - row["calculator_oscar_tokens"]) <= 0.05 * row["oscar_tokens"], row
    assert 1 <= row["max_running_requests"] <= 64, row
