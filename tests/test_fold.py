"""R_V folded into the V / output projection weights, and per-rank KV-head slicing.

The attention block is written out in torch (v = x Wvᵀ + b, per-query-head attention
over its KV head's values, y = concat(a) W_oᵀ): folding must leave y unchanged and make
v arrive rotated (the basis the backend stores), also when the weights are sharded
over tensor-parallel ranks exactly as sglang's QKV/Row-parallel layers shard them.
"""

from __future__ import annotations

import pytest
import torch

from oscar_sglang.fold import fold_value_weights, forbid_weight_reloads, kv_head_block

E, D, T = 48, 16, 7  # hidden, head_dim, tokens


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, D, D, generator=g, dtype=torch.float64))[0]


def _block(hq: int, hkv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_qkv = torch.randn((hq + 2 * hkv) * D, E, generator=g, dtype=torch.float64)
    b_qkv = torch.randn((hq + 2 * hkv) * D, generator=g, dtype=torch.float64)
    w_o = torch.randn(E, hq * D, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(hq, T, T, generator=g, dtype=torch.float64), -1)  # any attention pattern
    return w_qkv, b_qkv, w_o, probs


def _values(w_qkv, b_qkv, x, hq, hkv):
    v = x @ w_qkv[(hq + hkv) * D:].T + b_qkv[(hq + hkv) * D:]
    return v.view(T, hkv, D)


def _attention_out(w_qkv, b_qkv, w_o, probs, x, hq, hkv):
    v = _values(w_qkv, b_qkv, x, hq, hkv).repeat_interleave(hq // hkv, 1)  # [T, hq, D]
    a = torch.einsum("hts,shd->thd", probs, v)
    return a.reshape(T, hq * D) @ w_o.T


@pytest.mark.parametrize("hq,hkv,per_head", [(6, 2, True), (6, 2, False), (4, 4, True), (3, 1, True)])
def test_folding_keeps_the_block_output_and_rotates_v(hq, hkv, per_head):
    w_qkv, b_qkv, w_o, probs = _block(hq, hkv)
    x = torch.randn(T, E, dtype=torch.float64)
    r = _orthogonal(hkv if per_head else 1, seed=1)
    r = r if per_head else r[0]
    y = _attention_out(w_qkv, b_qkv, w_o, probs, x, hq, hkv)
    v = _values(w_qkv, b_qkv, x, hq, hkv)
    fold_value_weights(w_qkv, b_qkv, w_o, r.expand(hkv, D, D) if not per_head else r, hq)
    assert torch.allclose(_values(w_qkv, b_qkv, x, hq, hkv), torch.einsum("thd,hde->the", v, r.expand(hkv, D, D)))
    assert torch.allclose(_attention_out(w_qkv, b_qkv, w_o, probs, x, hq, hkv), y)


@pytest.mark.parametrize("total,size,expect", [
    (8, 1, [range(0, 8)]),
    (8, 2, [range(0, 4), range(4, 8)]),
    (8, 8, [range(i, i + 1) for i in range(8)]),
    (2, 4, [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]),  # tp > KV heads: replicated
])
def test_kv_head_block_follows_sglang_sharding(total, size, expect):
    assert [kv_head_block(total, rank, size) for rank in range(size)] == expect


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_folding_with_per_head_rotations_equals_unsharded(tp):
    """Each rank folds its own weight shard with its own KV heads' rotations; the
    row-parallel partial outputs sum (all-reduce) to the unfolded block's output."""
    hq, hkv = 8, 2
    w_qkv, b_qkv, w_o, probs = _block(hq, hkv, seed=3)
    x = torch.randn(T, E, dtype=torch.float64)
    r = _orthogonal(hkv, seed=4)
    y = _attention_out(w_qkv, b_qkv, w_o, probs, x, hq, hkv)
    q_per = hq // tp
    total = torch.zeros_like(y)
    for rank in range(tp):
        heads = kv_head_block(hkv, rank, tp)
        qs = range(rank * q_per, (rank + 1) * q_per)
        rows = lambda base, hs: [base + h * D + i for h in hs for i in range(D)]  # noqa: E731
        sel = rows(0, qs) + rows(hq * D, heads) + rows((hq + hkv) * D, heads)
        w_shard, b_shard = w_qkv[sel].clone(), b_qkv[sel].clone()
        o_shard = w_o[:, rows(0, qs)].clone()
        fold_value_weights(w_shard, b_shard, o_shard, r[list(heads)], q_per)
        total += _attention_out(w_shard, b_shard, o_shard, probs[list(qs)], x, q_per, len(heads))
    assert torch.allclose(total, y)


def test_weight_updates_after_folding_are_refused_before_loading():
    from oscar_sglang.settings import OscarError

    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    model.load_weights = lambda weights: [model.weight.data.copy_(w) for _, w in weights]
    forbid_weight_reloads(model)
    with pytest.raises(OscarError, match="restart the server"):
        model.load_weights(iter([("weight", torch.zeros(2, 2))]))
    assert torch.equal(model.weight, before)
