"""Rotations per tensor-parallel rank, and R_V folded into the model's weights at load time.

Row-vector convention (``x_rot = x @ R``). For the value rotation R_V of one layer
(per KV head h: R_h, [D, D]):

* V projection, rows of KV head h: ``v_h = x W_hᵀ + b_h``  ->  ``W_h' = R_hᵀ W_h``,
  ``b_h' = b_h R_h``, so v arrives already rotated (``v_h R_h``);
* attention output of query head j (KV head h(j)) is then in the rotated basis;
  the output projection ``y = Σ_j a_j W_o[:, j]ᵀ`` takes it back with
  ``W_o[:, j]' = W_o[:, j] R_h(j)``.

Both are exact in real arithmetic; in bf16 the folded weights are rounded once.
Folding removes the runtime un-rotation of every attention output (and the V
rotation on write). It applies to the standard sglang attention block
(``qkv_proj: QKVParallelLinear``, ``o_proj: RowParallelLinear``, ``attn:
RadixAttention``: Llama, Mistral, Qwen2/3, ...) with unquantized weights; any other
layout keeps the runtime path (``fold_values`` returns False and changes nothing).

Under tensor parallelism a rank holds a contiguous block of KV heads (replicated when
tp > KV heads, exactly as sglang's QKV weight loader shards them); per-KV-head
rotations are sliced to that block.
"""

from __future__ import annotations

from typing import Any

import torch


def kv_head_block(total_kv_heads: int, kv_rank: int, kv_size: int) -> range:
    """Global KV heads held by rank ``kv_rank`` of ``kv_size`` (sglang's QKVParallelLinear sharding)."""
    if kv_size >= total_kv_heads:  # each head replicated on kv_size // total_kv_heads ranks
        head = kv_rank // (kv_size // total_kv_heads)
        return range(head, head + 1)
    per = total_kv_heads // kv_size
    return range(kv_rank * per, (kv_rank + 1) * per)


def attention_blocks(model: torch.nn.Module) -> dict[int, Any]:
    """layer_id -> attention module with qkv_proj / o_proj / attn (empty if the model has another layout)."""
    blocks = {}
    for m in model.modules():
        attn = getattr(m, "attn", None)
        if hasattr(m, "qkv_proj") and hasattr(m, "o_proj") and hasattr(attn, "layer_id"):
            blocks[attn.layer_id] = m
    return blocks


def local_kv_heads(block: Any) -> range:
    """Global ids of the KV heads whose weights this rank holds for one attention block."""
    from sglang.srt.layers.linear import get_group_rank_size

    qkv = block.qkv_proj
    group = getattr(qkv, "kv_tp_group", None)
    rank, size = get_group_rank_size(group) if group is not None else (0, 1)
    heads = kv_head_block(qkv.total_num_kv_heads, rank, size)
    if len(heads) != block.attn.tp_k_head_num:
        raise ValueError(f"layer {block.attn.layer_id}: {len(heads)} KV heads by sharding, "
                         f"{block.attn.tp_k_head_num} in the attention layer")
    return heads


def rank_rotations(rot: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Per-KV-head rotations ``rot`` [L, H, D, D] of the global KV ``heads`` a rank holds. A head
    past H is padding: sglang's CPU engine pads the KV heads of a model whose heads --tp does not
    divide (zero weights, so zero keys and values); it gets the identity."""
    eye = torch.eye(rot.shape[-1], dtype=rot.dtype).expand(rot.shape[0], -1, -1)
    return torch.stack([rot[:, h] if h < rot.shape[1] else eye for h in heads], dim=1)


def per_head(r: torch.Tensor, heads: int) -> torch.Tensor:
    """One layer's rotation as [heads, D, D] (a per-layer [D, D] is shared by every head)."""
    return r.expand(heads, *r.shape[-2:]) if r.dim() == 2 else r


def _plain_weight(linear: Any) -> torch.Tensor | None:
    w = getattr(linear, "weight", None)
    method = type(getattr(linear, "quant_method", None)).__name__
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2 and method == "UnquantizedLinearMethod":
        return w
    return None


def _foldable(block: Any) -> bool:
    attn = block.attn
    w_qkv, w_o = _plain_weight(block.qkv_proj), _plain_weight(block.o_proj)
    d, hq, hkv = attn.head_dim, attn.tp_q_head_num, attn.tp_k_head_num
    return (w_qkv is not None and w_o is not None and getattr(attn, "v_head_dim", d) == d
            and w_qkv.shape[0] == (hq + 2 * hkv) * d and w_o.shape[1] == hq * d)


@torch.no_grad()
def fold_value_weights(w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, w_o: torch.Tensor, r: torch.Tensor,
                       hq: int) -> None:
    """In place: V rows of ``w_qkv`` [(hq + 2 hkv) D, E] (and ``b_qkv``) rotated by r [hkv, D, D];
    ``w_o`` [E, hq D] columns of query head j multiplied by r[j // (hq / hkv)]."""
    hkv, d = r.shape[0], r.shape[-1]
    r64 = r.to(w_qkv.device, torch.float64)
    v = w_qkv[(hq + hkv) * d:].view(hkv, d, -1)
    v.copy_(torch.einsum("hdk,hde->hek", v.double(), r64))
    if b_qkv is not None:
        bv = b_qkv[(hq + hkv) * d:].view(hkv, d)
        bv.copy_(torch.einsum("hd,hde->he", bv.double(), r64))
    o = w_o.view(w_o.shape[0], hkv, hq // hkv, d)
    o.copy_(torch.einsum("khgd,hde->khge", o.double(), r64))


def fold_values(blocks: dict[int, Any], rot_v: torch.Tensor, layers: range) -> bool:
    """Fold R_V (``rot_v[layer]``: [D, D] or [local KV heads, D, D]) into the weights of every
    layer in ``layers``; all or none (False: some layer has another layout, nothing changed).
    Idempotent per model: a second backend on the same model finds the weights folded."""
    if set(blocks) != set(layers) or not all(_foldable(b) for b in blocks.values()):
        return False
    for lid, block in blocks.items():
        if getattr(block, "oscar_values_folded", False):
            continue
        attn = block.attn
        fold_value_weights(block.qkv_proj.weight, getattr(block.qkv_proj, "bias", None), block.o_proj.weight,
                           per_head(rot_v[lid], attn.tp_k_head_num), attn.tp_q_head_num)
        block.oscar_values_folded = True
    return True


def forbid_weight_reloads(model: torch.nn.Module) -> None:
    """After folding, a weight update (``update_weights_from_*`` all end in
    ``model.load_weights``) would load unrotated V/output weights under a backend that
    expects folded ones. Refuse it before anything is loaded instead of serving garbage."""
    from oscar_sglang.settings import OscarError

    def refuse(*args, **kwargs):
        raise OscarError("--oscar folded R_V into the V/output projection weights at load time: "
                         "updating weights in place is not supported; restart the server with the new weights.")

    model.load_weights = refuse
