"""The ``oscar`` attention backend: rotated INT2 KV with BF16 sink/recent windows.

Per forward:
1. ``init_forward_metadata`` gives the tokens about to be written their window rows
   (``OscarKVPool.assign_windows``) and splits every request's cached tokens into an
   INT2 segment and a window segment (token slot ids, sglang's triton-backend convention).
2. Each layer rotates q by R_K, quantizes k/v on write (``ops.quantize_kv_write``),
   runs decode or extend attention over the two segments (plus, for extend, the chunk's
   own exact rotated k/v, causally), and un-rotates the output by R_V^T. Decode writes
   before attending (it reads its token from the pool); extend writes after, so every
   query of a chunk sees the ``recent`` tokens before the chunk in BF16, whatever the
   chunk size (writing first would let the chunk's ring rows evict them).

The same code runs on CPU (pure-torch references) and GPU (Triton kernels): the
``kernels.ops`` interface dispatches on the tensors' device.

R_V is folded into the V and output projections when the model allows it
(``fold.py``): v then arrives rotated and the output needs no un-rotation; otherwise
both happen at runtime. Under tensor parallelism per-KV-head rotations are sliced to
the rank's KV heads.

CUDA graphs (decode): ``init_cuda_graph_state`` allocates fixed-size metadata buffers;
``init_forward_metadata_out_graph`` (outside the graph, before capture and before each
replay) assigns window rows on the host and copies the batch's segments into those
buffers; the captured layers read only the buffers and a fixed split count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from oscar_sglang.fold import attention_blocks, fold_values, forbid_weight_reloads, local_kv_heads
from oscar_sglang.kernels import ops
from oscar_sglang.kernels.decode import plan_num_splits
from oscar_sglang.kernels.codec import sanitize
from oscar_sglang.kernels.reference import rotated_rows
from oscar_sglang.pool import OscarKVPool
from oscar_sglang.settings import OscarError, OscarSettings

logger = logging.getLogger(__name__)


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
    num_splits: int | None = None  # decode split-KV count, fixed under CUDA graphs


@dataclass(frozen=True)
class GraphBuffers:
    """Static decode metadata for CUDA graphs (sliced to the captured batch size)."""

    out_loc: torch.Tensor  # [max_bs] int64
    win_rows: torch.Tensor  # [max_bs] int64
    qo_indptr: torch.Tensor  # [max_bs + 1] arange
    int2_indptr: torch.Tensor  # [max_bs + 1]
    int2_indices: torch.Tensor  # [max_bs * context_len] int32
    win_indptr: torch.Tensor  # [max_bs + 1]
    win_indices: torch.Tensor  # [max_bs * (sink + recent)] int32


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


def _positions(seq_lens: torch.Tensor, new_lens: torch.Tensor) -> torch.Tensor:
    """Sequence positions of the tokens written this forward (the last new_lens[b] of each)."""
    starts = torch.repeat_interleave(seq_lens - new_lens, new_lens)
    first = torch.repeat_interleave(new_lens.cumsum(0) - new_lens, new_lens)
    return starts + torch.arange(starts.numel(), device=seq_lens.device) - first


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
        dev = model_runner.device
        blocks = attention_blocks(model_runner.model)
        if rot_k.dim() == 4:  # per KV head: keep this rank's heads
            heads = self._local_heads(blocks, rot_k.shape[1], model_runner.server_args.tp_size)
            rot_k, rot_v = rot_k[:, heads], rot_v[:, heads]
        self.rot_k = rot_k.to(dev, torch.float32).contiguous()
        layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
        self.values_folded = fold_values(blocks, rot_v, layers)
        if self.values_folded:
            forbid_weight_reloads(model_runner.model)
        logger.info("OSCAR: R_V %s", "folded into the V/output projections" if self.values_folded
                    else "applied at runtime (model layout not foldable)")
        eye = torch.eye(self.layout.head_dim, device=dev)
        self.rot_v = eye.expand(*rot_v.shape).contiguous() if self.values_folded else rot_v.to(dev, torch.float32)
        self.forward_metadata: ForwardMetadata | None = None
        self.graph: GraphBuffers | None = None
        self.graph_metadata: dict[int, ForwardMetadata] = {}

    @staticmethod
    def _local_heads(blocks: dict, total: int, tp_size: int) -> list[int]:
        if not blocks:
            if tp_size > 1:
                raise OscarError("per-KV-head rotations with --tp > 1 need the standard attention block "
                                 "(qkv_proj/o_proj/attn); calibrate this model with --granularity layer.")
            return list(range(total))
        try:
            ranges = {tuple(local_kv_heads(b)) for b in blocks.values()}
        except ValueError as e:
            raise OscarError(f"per-KV-head rotations: {e}") from None
        if len(ranges) != 1:
            raise OscarError(f"per-KV-head rotations: layers hold different KV heads on this rank: {sorted(ranges)}")
        return list(ranges.pop())

    # ---------------------------------------------------------------- metadata
    def _metadata(self, req_idx, seq_lens, new_lens, out_loc, decode: bool) -> ForwardMetadata:
        dev = self.pool.win_of_slot.device
        req_idx, seq_lens = req_idx.to(dev, torch.int64), seq_lens.to(dev, torch.int64)
        new_lens, out_loc = new_lens.to(dev, torch.int64), out_loc.to(dev, torch.int64)
        def assign():
            return self.pool.assign_windows(out_loc, _positions(seq_lens, new_lens),
                                            torch.repeat_interleave(req_idx, new_lens),
                                            torch.repeat_interleave(seq_lens, new_lens))

        # Decode writes its token first and attends to everything, the token included, so its
        # segments follow the window assignment. Extend attends to the cached prefix as it stands
        # before this forward (the recent window ends at the chunk start) and to the chunk exactly,
        # and writes afterwards, so its chunk's ring rows cannot evict the prefix it is reading.
        if decode:
            win_rows = assign()
            segments = split_cached_tokens(self.pool, self.req_to_token, req_idx, seq_lens)
        else:
            segments = split_cached_tokens(self.pool, self.req_to_token, req_idx, seq_lens - new_lens)
            win_rows = assign()
        return ForwardMetadata(out_loc, win_rows, _indptr(new_lens), *segments)

    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        seq_lens = forward_batch.seq_lens
        new_lens = torch.ones_like(seq_lens) if mode.is_decode() else forward_batch.extend_seq_lens
        self.forward_metadata = self._metadata(forward_batch.req_pool_indices, seq_lens, new_lens,
                                               forward_batch.out_cache_loc, mode.is_decode())

    # ------------------------------------------------------------- CUDA graphs
    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        dev, i64 = self.pool.win_of_slot.device, torch.int64
        self.graph = GraphBuffers(
            out_loc=torch.zeros(max_bs, dtype=i64, device=dev),
            win_rows=torch.full((max_bs,), -1, dtype=i64, device=dev),
            qo_indptr=torch.arange(max_bs + 1, dtype=i64, device=dev),
            int2_indptr=torch.zeros(max_bs + 1, dtype=i64, device=dev),
            int2_indices=torch.zeros(max_bs * self.req_to_token.shape[1], dtype=torch.int32, device=dev),
            win_indptr=torch.zeros(max_bs + 1, dtype=i64, device=dev),
            win_indices=torch.zeros(max_bs * (self.pool.sink + self.pool.recent), dtype=torch.int32, device=dev),
        )
        self.graph_metadata = {}

    def _graph_splits(self, bs: int) -> int:
        """Split count baked into the graph of batch size bs: sized for long contexts
        (short ones leave most splits empty, which exit at once)."""
        dev = self.pool.win_of_slot.device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        return plan_num_splits(bs, self.pool.head_num, self.req_to_token.shape[1], sms)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        g, bs = self.graph, forward_batch.batch_size
        if g is None or not forward_batch.forward_mode.is_decode():
            raise OscarError("the oscar backend captures decode batches only (no speculative decoding)")
        if in_capture:  # empty segments, no window rows: capture must not touch the pool's state
            g.out_loc[:bs].zero_()
            g.win_rows[:bs].fill_(-1)
            g.int2_indptr.zero_()
            g.win_indptr.zero_()
            self.graph_metadata[bs] = ForwardMetadata(
                g.out_loc[:bs], g.win_rows[:bs], g.qo_indptr[: bs + 1], g.int2_indptr[: bs + 1], g.int2_indices,
                g.win_indptr[: bs + 1], g.win_indices, self._graph_splits(bs))
            self.forward_metadata = self.graph_metadata[bs]
            return
        raw = bs - getattr(forward_batch, "num_padding", 0)  # padded requests get empty segments
        seq_lens = forward_batch.seq_lens[:raw]
        md = self._metadata(forward_batch.req_pool_indices[:raw], seq_lens, torch.ones_like(seq_lens),
                            forward_batch.out_cache_loc[:raw], decode=True)
        g.out_loc[:raw].copy_(md.out_loc)
        g.out_loc[raw:bs].zero_()
        g.win_rows[:raw].copy_(md.win_rows)
        g.win_rows[raw:bs].fill_(-1)
        for indptr, indices, buf_ptr, buf_idx in ((md.int2_indptr, md.int2_indices, g.int2_indptr, g.int2_indices),
                                                  (md.win_indptr, md.win_indices, g.win_indptr, g.win_indices)):
            buf_ptr[: raw + 1].copy_(indptr)
            buf_ptr[raw + 1: bs + 1].copy_(indptr[-1])
            buf_idx[: indices.numel()].copy_(indices)
        self.forward_metadata = self.graph_metadata[bs]

    # ----------------------------------------------------------------- forward
    def _rotate_q(self, q: torch.Tensor, lid: int) -> torch.Tensor:
        r = self.rot_k[lid]
        if r.dim() == 2:
            return (q.float() @ r).to(q.dtype)
        t, hq, d = q.shape
        hkv = r.shape[0]
        return torch.einsum("thgd,hde->thge", q.float().view(t, hkv, hq // hkv, d), r).reshape(t, hq, d).to(q.dtype)

    def _unrotate_out(self, o: torch.Tensor, lid: int) -> torch.Tensor:
        if self.values_folded:  # o_proj takes the rotated basis
            return o
        r = self.rot_v[lid]
        if r.dim() == 2:
            return o.float() @ r.T
        t, hq, d = o.shape
        hkv = r.shape[0]
        return torch.einsum("thge,hde->thgd", o.float().view(t, hkv, hq // hkv, d), r).reshape(t, hq, d)

    def _write(self, k3, v3, lid: int) -> None:
        md = self.forward_metadata
        self.pool.write_rows(lid, md.out_loc, k3, v3, md.win_rows, self.rot_k[lid], self.rot_v[lid],
                             self.settings.clip_k[lid], self.settings.clip_v[lid])

    def _views(self, q, k, v, layer):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid = self.forward_metadata, layer.layer_id
        q3, k3, v3 = self._views(q, k, v, layer)
        if save_kv_cache:  # the new token is read back from the pool
            self._write(k3, v3, lid)
        out, _ = ops.decode_attention(
            self._rotate_q(q3, lid), *self.pool.get_kv_buffer(lid), md.int2_indptr, md.int2_indices,
            *self.pool.get_window_buffers(lid), md.win_indptr, md.win_indices, layer.scaling, self.layout,
            num_splits=md.num_splits,
        )
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid = self.forward_metadata, layer.layer_id
        q3, k3, v3 = self._views(q, k, v, layer)
        qr = self._rotate_q(q3, lid)
        # The chunk attends to its own k/v exactly as stored (sanitized, rotated): one non-finite
        # value must not turn the whole chunk NaN through 0 * NaN in the masked attention.
        kr = rotated_rows(k3, self.rot_k[lid]).to(qr.dtype)
        vr = (sanitize(v3) if self.values_folded else rotated_rows(v3, self.rot_v[lid])).to(qr.dtype)
        out = ops.extend_attention(
            qr, kr, vr, md.qo_indptr, *self.pool.get_kv_buffer(lid), md.int2_indptr, md.int2_indices,
            *self.pool.get_window_buffers(lid), md.win_indptr, md.win_indices, layer.scaling, self.layout,
        )
        if save_kv_cache:  # after attention: see _metadata
            self._write(k3, v3, lid)
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def support_triton(self):
        return False
