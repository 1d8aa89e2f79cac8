"""The ``oscar`` attention backend: rotated 2-4-bit KV rows with full-precision sinks and blocks.

"INT2" below names the quantized storage rows, whatever their width: every layer's K and V rows
have the code widths (2, 3 or 4 bits) of the rotations file's bit allocation (``pool.layouts``).

The position rule (``kernels/rule.py``): the query at position t reads key j in full precision
iff ``j < sink`` or j is in t's own block (``j >= exact_from(t) = t // block * block``), else
from its packed row, in decode and extend, for a chunk's own tokens and for cached ones. The
quantized model is then one function of the token sequence: cached == uncached, any chunk size
== any other, batched == alone.

Per forward:

1. ``init_forward_metadata`` splits every request's keys into a packed segment (slots of
   sglang's request table) and a window segment (rows of its window table, ``windows.py``,
   which the scheduler hooks moved to this forward: a prefix hit's table reads the cached
   prefix's attached rows).
2. Each layer quantizes k/v on write and rotates q by R_K (one ``ops.write_step``),
   runs decode or extend attention (extend adds the chunk's own exact rotated k/v and
   applies the rule per query), and un-rotates the output by R_V^T. Decode writes before
   attending (it reads its token from the pool). Extend writes the packed rows first and the
   window rows after attention.

The same code runs on CPU (pure-torch references) and GPU (Triton kernels): the
``kernels.ops`` interface dispatches on the tensors' device.

R_V is folded into the V and output projections when the model allows it
(``fold.py``): v then arrives rotated and the output needs no un-rotation; otherwise
both happen at runtime. Under tensor parallelism per-KV-head rotations are sliced to
the rank's KV heads.

CUDA graphs (decode): ``init_cuda_graph_state`` allocates fixed-size metadata buffers;
``init_forward_metadata_out_graph`` (outside the graph, before capture and before each
replay) builds the batch's segments and copies them into those buffers; the captured layers
read only the buffers and a fixed split count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from oscar_sglang.fold import attention_blocks, fold_values, forbid_weight_reloads, local_kv_heads, rank_rotations
from oscar_sglang.kernels import ops
from oscar_sglang.kernels.checks import sm_count
from oscar_sglang.kernels.decode import plan_num_splits
from oscar_sglang.kernels.reference import rotated_rows
from oscar_sglang.pool import OscarKVPool
from oscar_sglang.settings import OscarError, OscarSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardMetadata:
    """Index tensors for one forward (on the pool device). Under CUDA graphs one instance holds
    the static decode buffers at the largest batch (``init_cuda_graph_state``), and each captured
    batch size reads views of them."""

    out_loc: torch.Tensor  # [T] slots written this forward
    win_rows: torch.Tensor | None  # decode: [T] their window rows; extend: None
    qo_indptr: torch.Tensor  # [B+1] extend chunk boundaries (decode: arange)
    packed_indptr: torch.Tensor  # [B+1]
    packed_indices: torch.Tensor  # slot ids into the packed rows, position order
    win_indptr: torch.Tensor  # [B+1]
    win_indices: torch.Tensor  # window rows: the sinks, then the block part, position order
    prefix_lens: torch.Tensor | None = None  # extend: [B] first position of each chunk
    win_src: torch.Tensor | None = None  # extend: chunk tokens whose window rows are written after attention
    win_dst: torch.Tensor | None = None  # extend: ... and those window rows
    num_splits: int | None = None  # decode split-KV count, fixed under CUDA graphs
    max_q_len: int | None = None  # extend: the longest chunk (host int: no sync per layer)
    chunk_rows: torch.Tensor | None = None  # extend: arange(T), the chunk tokens' rows in the rotated scratch


def _up(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host -> device without a stream sync. A blocking copy synchronizes the stream (torch's
    memcpy_and_sync), which would stall sglang's overlap scheduler at every forward; from
    pageable memory the driver stages the bytes before returning, so ``t`` may be reused at once."""
    return t.to(dev, non_blocking=True)


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _gather_slots(req_to_token, req_rows_dev, starts: torch.Tensor, lens: torch.Tensor):
    """indptr and slots of positions [starts[b], starts[b] + lens[b]) of every request, gathered
    on the device from sglang's request table (host-known sizes: no device sync)."""
    dev = req_to_token.device
    total = int(lens.sum())
    lens_d, starts_d = _up(lens, dev), _up(starts, dev)
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens_d, output_size=total)
    first = (lens_d.cumsum(0) - lens_d)[owner]
    pos = starts_d[owner] + torch.arange(total, device=dev) - first
    return _up(_indptr(lens), dev), req_to_token[req_rows_dev[owner], pos].to(torch.int64)


def _gather_window(table, rows_dev, n_sink: torch.Tensor, col0: torch.Tensor, n_block: torch.Tensor):
    """indptr and window row ids of every request: its table's columns [0, n_sink[b]) (the sinks), then
    [col0[b], col0[b] + n_block[b]) (its block), gathered on the device (host-known sizes: no sync)."""
    dev = table.device
    lens = n_sink + n_block
    total = int(lens.sum())
    lens_d, sink_d, col0_d = _up(lens, dev), _up(n_sink, dev), _up(col0, dev)
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens_d, output_size=total)
    j = torch.arange(total, device=dev) - (lens_d.cumsum(0) - lens_d)[owner]
    col = torch.where(j < sink_d[owner], j, col0_d[owner] + j - sink_d[owner])
    return _up(_indptr(lens), dev), table[rows_dev[owner], col].to(torch.int64)


class OscarAttnBackend(AttentionBackend):
    def __init__(self, model_runner, settings: OscarSettings, rot_k: torch.Tensor, rot_v: torch.Tensor):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, OscarKVPool):
            raise OscarError(f"the oscar attention backend needs the OSCAR KV pool, got {type(pool).__name__}")
        self.pool = pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.settings = settings
        dev = model_runner.device
        blocks = attention_blocks(model_runner.model)
        if rot_k.dim() == 4:  # per KV head: keep this rank's heads
            total = rot_k.shape[1]
            heads = self._local_heads(blocks, total, model_runner.server_args.tp_size)
            rot_k, rot_v = rank_rotations(rot_k, heads), rank_rotations(rot_v, heads)
            logger.info("OSCAR: this rank uses the rotations of KV heads %s of the file's %d", heads, total)
        self.rot_k = rot_k.to(dev, torch.float32).contiguous()
        layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
        self.values_folded = fold_values(blocks, rot_v, layers)
        if self.values_folded:
            forbid_weight_reloads(model_runner.model)
        logger.info("OSCAR: R_V %s", "folded into the V/output projections" if self.values_folded
                    else "applied at runtime (model layout not foldable)")
        # Folded: values arrive rotated, nothing rotates them again (None: the write skips its dot).
        self.rot_v = None if self.values_folded else rot_v.to(dev, torch.float32)
        self.forward_metadata: ForwardMetadata | None = None
        self.graph: ForwardMetadata | None = None
        self.graph_metadata: dict[int, ForwardMetadata] = {}

    @property
    def token_to_kv_pool(self) -> OscarKVPool:
        """The pool, by the name sglang's models read it (``get_token_to_kv_pool``: Qwen3-MoE's attention)."""
        return self.pool

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
    def _metadata(self, req_rows: torch.Tensor, seq_lens: torch.Tensor, new_lens: torch.Tensor, out_loc,
                  decode: bool) -> ForwardMetadata:
        """Index tensors of one forward under the position rule (``req_rows``/``seq_lens``/``new_lens``:
        host int64 [B]; ``out_loc``: the written slots on the device). The window store has already
        moved every request's table to this forward (``plugin``: ``begin_extend`` / ``begin_decode``).

        Decode writes its token at t = n - 1 (storage row + window row) first and reads the quantized
        rows of [sink, exact_from(t)) and the window: sinks and [exact_from(t), t]. Extend writes the
        chunk's storage rows first, attends (quantized rows of [sink, exact_from(e - 1)), the window
        before the chunk: sinks and [exact_from(a), a), the chunk exactly; per-query masks pick one
        copy of each key) and writes the chunk's window rows afterwards (``ExtendPlan``).
        """
        store, rule = self.pool.store, self.pool.rule
        s = rule.sink
        dev = store.table_dev.device
        store.flush()
        rows_d = _up(req_rows, dev)
        last = seq_lens - 1
        block_of_last = rule.exact_from(last)
        quant_hi = block_of_last.clamp(min=s)  # quantized keys: [sink, exact_from(last query))
        packed_indptr, packed_indices = _gather_slots(self.req_to_token, rows_d, torch.full_like(seq_lens, s), quant_hi - s)
        if decode:
            win_indptr, win_ids = _gather_window(store.table_dev, rows_d, seq_lens.clamp(max=s),
                                                 s + quant_hi - block_of_last, (seq_lens - quant_hi).clamp(min=0))
            written = store.table[req_rows, torch.where(last < s, last, s + last - block_of_last)]
            return ForwardMetadata(out_loc, _up(written, dev), _up(_indptr(new_lens), dev), packed_indptr, packed_indices,
                                   win_indptr, win_ids)
        plans = [store.plans.pop(int(r), None) for r in req_rows]
        if None in plans:
            raise OscarError("the oscar backend runs extend batches that ScheduleBatch.prepare_for_extend prepared "
                             f"(request rows {req_rows.tolist()} have no window plan)")
        first = new_lens.cumsum(0) - new_lens
        prefix = [p.prefix_ids for p in plans]
        src = torch.cat([p.write_offsets + f for p, f in zip(plans, first.tolist())])
        dst = torch.cat([p.write_ids for p in plans])
        total = int(new_lens.sum())
        return ForwardMetadata(out_loc, None, _up(_indptr(new_lens), dev), packed_indptr, packed_indices,
                               _up(_indptr(torch.tensor([len(p) for p in prefix], dtype=torch.int64)), dev),
                               _up(torch.cat(prefix), dev), _up(seq_lens - new_lens, dev), _up(src, dev), _up(dst, dev),
                               max_q_len=int(new_lens.max()) if total else 0,
                               chunk_rows=torch.arange(total, device=dev))

    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        self.forward_metadata = self._metadata(*self._host_lens(forward_batch), forward_batch.out_cache_loc,
                                               mode.is_decode())

    @staticmethod
    def _host_lens(forward_batch, raw: int | None = None):
        """Host (req_rows, seq_lens, new_lens) int64 [B] of a batch (its first ``raw`` requests)."""
        def host(name):  # the batch's host copy where sglang keeps one, else one device->host copy
            cpu = getattr(forward_batch, f"{name}_cpu", None)
            return torch.as_tensor(cpu if cpu is not None else getattr(forward_batch, name).cpu()).long()[:raw]
        seq = host("seq_lens")
        new = torch.ones_like(seq) if forward_batch.forward_mode.is_decode() else host("extend_seq_lens")
        return host("req_pool_indices"), seq, new

    # ------------------------------------------------------------- CUDA graphs
    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        dev, i64 = self.pool.store.table_dev.device, torch.int64
        self.graph = ForwardMetadata(
            out_loc=torch.zeros(max_bs, dtype=i64, device=dev),
            win_rows=torch.full((max_bs,), -1, dtype=i64, device=dev),
            qo_indptr=torch.arange(max_bs + 1, dtype=i64, device=dev),
            packed_indptr=torch.zeros(max_bs + 1, dtype=i64, device=dev),
            packed_indices=torch.zeros(max_bs * self.req_to_token.shape[1], dtype=torch.int32, device=dev),
            win_indptr=torch.zeros(max_bs + 1, dtype=i64, device=dev),
            win_indices=torch.zeros(max_bs * self.pool.store.cols, dtype=torch.int32, device=dev),
        )
        self.graph_metadata = {}

    def _graph_splits(self, bs: int) -> int:
        """Split count baked into the graph of batch size bs: sized for long contexts
        (short ones leave most splits empty, which exit at once)."""
        sms = sm_count(self.pool.store.table_dev.device)
        return plan_num_splits(bs, self.pool.head_num, self.req_to_token.shape[1], sms)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        g, bs = self.graph, forward_batch.batch_size
        if g is None or not forward_batch.forward_mode.is_decode():
            raise OscarError("the oscar backend captures decode batches only (no speculative decoding)")
        if in_capture:  # empty segments, no window rows: capture must not touch the pool's state
            g.out_loc[:bs].zero_()
            g.win_rows[:bs].fill_(-1)
            g.packed_indptr.zero_()
            g.win_indptr.zero_()
            self.graph_metadata[bs] = ForwardMetadata(
                g.out_loc[:bs], g.win_rows[:bs], g.qo_indptr[: bs + 1], g.packed_indptr[: bs + 1], g.packed_indices,
                g.win_indptr[: bs + 1], g.win_indices, num_splits=self._graph_splits(bs))
            self.forward_metadata = self.graph_metadata[bs]
            return
        raw = bs - getattr(forward_batch, "num_padding", 0)  # padded requests get empty segments
        md = self._metadata(*self._host_lens(forward_batch, raw), forward_batch.out_cache_loc[:raw], decode=True)
        g.out_loc[:raw].copy_(md.out_loc)
        g.out_loc[raw:bs].zero_()
        g.win_rows[:raw].copy_(md.win_rows)
        g.win_rows[raw:bs].fill_(-1)
        for indptr, indices, buf_ptr, buf_idx in ((md.packed_indptr, md.packed_indices, g.packed_indptr, g.packed_indices),
                                                  (md.win_indptr, md.win_indices, g.win_indptr, g.win_indices)):
            buf_ptr[: raw + 1].copy_(indptr)
            buf_ptr[raw + 1: bs + 1].copy_(indptr[-1])
            buf_idx[: indices.numel()].copy_(indices)
        self.forward_metadata = self.graph_metadata[bs]

    # ----------------------------------------------------------------- forward
    def _rotate_q(self, q: torch.Tensor, lid: int) -> torch.Tensor:
        return ops.rotate_queries(q, self.rot_k[lid])

    def _unrotate_out(self, o: torch.Tensor, lid: int) -> torch.Tensor:
        if self.values_folded:  # o_proj takes the rotated basis
            return o
        r = self.rot_v[lid]
        if r.dim() == 2:
            return o.float() @ r.T
        t, hq, d = o.shape
        hkv = r.shape[0]
        return torch.einsum("thge,hde->thgd", o.float().view(t, hkv, hq // hkv, d), r).reshape(t, hq, d)

    def _rot_v(self, lid: int) -> torch.Tensor | None:
        return None if self.rot_v is None else self.rot_v[lid]

    def _write(self, q3, k3, v3, lid: int, win_rows, rotated=None) -> torch.Tensor:
        """Write the layer's k/v and return its rotated queries (one launch on a GPU)."""
        md = self.forward_metadata
        return self.pool.write_rows(lid, md.out_loc, k3, v3, win_rows, self.rot_k[lid], self._rot_v(lid),
                                    self.settings.clip_k[lid], self.settings.clip_v[lid], rotated, q=q3)

    def _views(self, q, k, v, layer):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid = self.forward_metadata, layer.layer_id
        q3, k3, v3 = self._views(q, k, v, layer)
        # the new token is read back from the pool
        qr = self._write(q3, k3, v3, lid, md.win_rows) if save_kv_cache else self._rotate_q(q3, lid)
        k_lay, v_lay = self.pool.layouts(lid)
        (k_rows, v_rows), (k_win, v_win) = self.pool.get_kv_buffer(lid), self.pool.window_rows(lid)
        out, _ = ops.decode_attention(
            qr, k_rows=k_rows, v_rows=v_rows, packed_indptr=md.packed_indptr, packed_indices=md.packed_indices,
            k_win=k_win, v_win=v_win, win_indptr=md.win_indptr, win_indices=md.win_indices, sm_scale=layer.scaling,
            layout=k_lay, num_splits=md.num_splits, v_layout=v_lay,
        )
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md, lid = self.forward_metadata, layer.layer_id
        q3, k3, v3 = self._views(q, k, v, layer)
        # The chunk attends to its own k/v exactly as stored (sanitized, rotated: one non-finite
        # value must not turn the whole chunk NaN through 0 * NaN in the masked attention). The
        # write returns them (its rotation, done once); packed rows are written first: queries far
        # enough into the chunk read its older tokens there.
        kr, vr = (torch.empty(k3.shape, dtype=q3.dtype, device=q3.device) for _ in range(2))
        if save_kv_cache:
            qr = self._write(q3, k3, v3, lid, None, rotated=(kr, vr, md.chunk_rows))
        else:
            qr = self._rotate_q(q3, lid)
            kr.copy_(rotated_rows(k3, self.rot_k[lid]))
            vr.copy_(rotated_rows(v3, self._rot_v(lid)))
        k_lay, v_lay = self.pool.layouts(lid)
        (k_rows, v_rows), (k_win, v_win) = self.pool.get_kv_buffer(lid), self.pool.window_rows(lid)
        out = ops.extend_attention(
            qr, k_new=kr, v_new=vr, qo_indptr=md.qo_indptr, k_rows=k_rows, v_rows=v_rows,
            packed_indptr=md.packed_indptr, packed_indices=md.packed_indices, k_win=k_win, v_win=v_win,
            win_indptr=md.win_indptr, win_indices=md.win_indices, prefix_lens=md.prefix_lens, rule=self.pool.rule,
            sm_scale=layer.scaling, layout=k_lay, max_q_len=md.max_q_len, v_layout=v_lay,
        )
        if save_kv_cache:  # window rows after attention: see _metadata
            self.pool.write_windows(lid, md.win_dst, kr[md.win_src], vr[md.win_src])
        return self._unrotate_out(out, lid).to(q.dtype).reshape(q.shape[0], -1)

    def support_triton(self):
        return False
