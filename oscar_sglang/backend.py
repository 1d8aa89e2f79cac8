"""The ``oscar`` attention backend: rotated INT2 KV with BF16 sink/recent windows.

Per forward:
1. ``init_forward_metadata`` gives the tokens about to be written their window rows
   (``OscarKVPool.assign_windows``) and splits every request's cached tokens into an
   INT2 segment and a window segment (token slot ids, sglang's triton-backend convention).
2. Each layer rotates q by R_K, quantizes k/v on write (``ops.quantize_kv_write``),
   runs decode or extend attention over the two segments (plus, for extend, the chunk's
   own exact rotated k/v, causally), and un-rotates the output by R_V^T.

The same code runs on CPU (pure-torch references) and GPU (Triton kernels): the
``kernels.ops`` interface dispatches on the tensors' device. R_V is applied at runtime
(two small [D, D] matmuls per layer); see the README for why it is not folded into
the projection weights yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from oscar_sglang.kernels import ops
from oscar_sglang.kernels.codec import rotate
from oscar_sglang.pool import OscarKVPool
from oscar_sglang.settings import OscarError, OscarSettings


@dataclass(frozen=True)
class ForwardMetadata:
    """Index tensors for one forward (all int64 on the pool device)."""

    out_loc: torch.Tensor  # [T] slots written this forward
    win_rows: torch.Tensor  # [T] their window rows (-1 = INT2 only)
    qo_indptr: torch.Tensor  # [B+1] extend chunk boundaries (decode: arange)
    int2_indptr: torch.Tensor  # [B+1]
    int2_indices: torch.Tensor  # slot ids into the INT2 rows
    win_indptr: torch.Tensor  # [B+1]
    win_indices: torch.Tensor  # row ids into the window buffers


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def split_cached_tokens(pool: OscarKVPool, req_to_token, req_pool_indices, lens):
    """Per request, the slots of its first ``lens[b]`` tokens, split by window membership.

    Returns (int2_indptr, int2_indices, win_indptr, win_indices); order within a request
    is position order.
    """
    dev = pool.win_of_slot.device
    lens = lens.to(dev, torch.int64)
    b = lens.numel()
    req_of = torch.repeat_interleave(torch.arange(b, device=dev), lens)
    pos = torch.arange(req_of.numel(), device=dev) - (lens.cumsum(0) - lens)[req_of]
    slots = req_to_token[req_pool_indices.to(dev)[req_of], pos].to(torch.int64)
    rows = pool.win_of_slot[slots]
    in_win = rows >= 0
    win_counts = torch.zeros(b, dtype=torch.int64, device=dev).index_add_(0, req_of, in_win.long())
    return _indptr(lens - win_counts), slots[~in_win], _indptr(win_counts), rows[in_win]


class OscarAttnBackend(AttentionBackend):
    def __init__(self, model_runner, settings: OscarSettings, rot_k: torch.Tensor, rot_v: torch.Tensor):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, OscarKVPool):
            raise OscarError(f"the oscar attention backend needs the OSCAR KV pool, got {type(pool).__name__}")
        self.pool = pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.settings = settings
        self.layout = settings.layout
        self.rot_k = rot_k.to(model_runner.device, torch.float32)
        self.rot_v = rot_v.to(model_runner.device, torch.float32)
        self.forward_metadata: ForwardMetadata | None = None

    # ---------------------------------------------------------------- metadata
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        dev = self.pool.win_of_slot.device
        seq_lens = forward_batch.seq_lens.to(dev, torch.int64)
        req_idx = forward_batch.req_pool_indices.to(dev, torch.int64)
        if mode.is_decode():
            new_lens = torch.ones_like(seq_lens)
        else:
            new_lens = forward_batch.extend_seq_lens.to(dev, torch.int64)
        out_loc = forward_batch.out_cache_loc.to(dev, torch.int64)
        positions = torch.repeat_interleave(seq_lens - new_lens, new_lens)
        positions = positions + torch.arange(positions.numel(), device=dev) - torch.repeat_interleave(
            new_lens.cumsum(0) - new_lens, new_lens
        )
        win_rows = self.pool.assign_windows(
            out_loc,
            positions,
            torch.repeat_interleave(req_idx, new_lens),
            torch.repeat_interleave(seq_lens, new_lens),
        )
        # Decode attends to everything, the new token included (written before attention);
        # extend reads only the cached prefix from the pool and the chunk exactly.
        read_lens = seq_lens if mode.is_decode() else seq_lens - new_lens
        segments = split_cached_tokens(self.pool, self.req_to_token, req_idx, read_lens)
        self.forward_metadata = ForwardMetadata(out_loc, win_rows, _indptr(new_lens), *segments)

    # ----------------------------------------------------------------- forward
    def _rotate_q(self, q: torch.Tensor, lid: int) -> torch.Tensor:
        r = self.rot_k[lid]
        if r.dim() == 2:
            return (q.float() @ r).to(q.dtype)
        t, hq, d = q.shape
        hkv = r.shape[0]
        return torch.einsum("thgd,hde->thge", q.float().view(t, hkv, hq // hkv, d), r).reshape(t, hq, d).to(q.dtype)

    def _unrotate_out(self, o: torch.Tensor, lid: int) -> torch.Tensor:
        r = self.rot_v[lid]
        if r.dim() == 2:
            return o.float() @ r.T
        t, hq, d = o.shape
        hkv = r.shape[0]
        return torch.einsum("thge,hde->thgd", o.float().view(t, hkv, hq // hkv, d), r).reshape(t, hq, d)

    def _prepare(self, q, k, v, layer, save_kv_cache: bool):
        md = self.forward_metadata
        lid = layer.layer_id
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        k3, v3 = k.view(-1, hkv, d), v.view(-1, hkv, d)
        if save_kv_cache:
            self.pool.write_rows(
                lid, md.out_loc, k3, v3, md.win_rows, self.rot_k[lid], self.rot_v[lid],
                self.settings.clip_k[lid], self.settings.clip_v[lid],
            )
        k_rows, v_rows = self.pool.get_kv_buffer(lid)
        k_win, v_win = self.pool.get_window_buffers(lid)
        return md, lid, self._rotate_q(q.view(-1, hq, d), lid), k3, v3, k_rows, v_rows, k_win, v_win

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid, qr, _, _, k_rows, v_rows, k_win, v_win = self._prepare(q, k, v, layer, save_kv_cache)
        out, _ = ops.decode_attention(
            qr, k_rows, v_rows, md.int2_indptr, md.int2_indices, k_win, v_win, md.win_indptr, md.win_indices,
            layer.scaling, self.layout,
        )
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid, qr, k3, v3, k_rows, v_rows, k_win, v_win = self._prepare(q, k, v, layer, save_kv_cache)
        kr = rotate(k3, self.rot_k[lid]).to(qr.dtype)
        vr = rotate(v3, self.rot_v[lid]).to(qr.dtype)
        out = ops.extend_attention(
            qr, kr, vr, md.qo_indptr, k_rows, v_rows, md.int2_indptr, md.int2_indices, k_win, v_win,
            md.win_indptr, md.win_indices, layer.scaling, self.layout,
        )
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def support_triton(self):
        return False
