"""Attention-aware quantization error, measured per layer on captured q, k, v.

For a candidate (R_K, R_V, clip_k, clip_v) the keys and values of one sequence are rotated,
fake-quantized with ``oscar_sglang.kernels.codec.fake_quantize`` (the reference INT2 codec),
un-rotated, and used in causal softmax attention against the exact queries:

- attention-logit error  = Σ (q·k̂ - q·k)² / Σ (q·k)² over the (query, key) pairs whose key is
  quantized;
- attention-output error = Σ ‖ô - o‖² / Σ ‖o‖² over query positions, o = softmax(q·kᵀ·s) v.

With ``windows`` (the file's position rule, ``Windows.rule``) the keys a query reads in full
precision in serving keep it here too, and only queries that read some key quantized are scored.
With ``windows=None`` every key is quantized and every query is scored.
Queries are subsampled with ``query_stride`` to bound the cost (keys never are).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from oscar_sglang.kernels.codec import CacheLayout, RowLayout, fake_quantize, rotate, widths_for

from oscar_sglang.kernels.rule import PositionRule

from .rotations import Windows

CLIP_GRID = (0.70, 0.75, 0.80, 0.84, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One quantization setting. ``key``/``value``: [L, D, D] or [L, H_kv, D, D] (float32);
    ``clip_k``/``clip_v``: per-layer ratios; a ratio of None leaves that tensor unquantized;
    ``key_bits``/``value_bits``: per-layer code widths (None: 2 bits everywhere)."""

    name: str
    key: torch.Tensor
    value: torch.Tensor
    clip_k: list[float | None]
    clip_v: list[float | None]
    key_bits: list[int] | None = None
    value_bits: list[int] | None = None

    def layouts(self, base: RowLayout, layer: int) -> tuple[RowLayout, RowLayout]:
        """(key, value) row layouts of ``layer``: ``base`` at this candidate's bit widths."""
        kb = self.key_bits[layer] if self.key_bits else base.bits
        vb = self.value_bits[layer] if self.value_bits else base.bits
        return base.with_bits(kb), base.with_bits(vb)


def quantize_through(x: torch.Tensor, r: torch.Tensor, ratio: float | None, layout: RowLayout) -> torch.Tensor:
    """x [H, T, D] -> fp32 [H, T, D]: rotate by R ([D, D] or [H, D, D]), fake-quantize, rotate back."""
    if ratio is None:
        return x.float()
    xt = x.float().transpose(0, 1)  # [T, H, D]: codec.rotate wants the head axis second to last
    r = r.to(x.device)
    xq = fake_quantize(rotate(xt, r), layout, ratio)
    return rotate(xq, r.transpose(-1, -2)).transpose(0, 1)


@dataclass
class _Prepared:
    """Exact attention of one (sequence, layer) for the scored queries, shared by all candidates."""

    q: torch.Tensor  # [H_q, n, D] scored queries
    v: torch.Tensor  # [H_q, T, D] (GQA-expanded)
    quant: torch.Tensor  # float [n, T]: 1 where key j is quantized for query i
    logits: torch.Tensor  # [H_q, n, T] scaled, -inf where not causal
    raw: torch.Tensor  # [H_q, n, T] scaled, 0 where not causal
    probs: torch.Tensor
    probs_quant: torch.Tensor  # probs * quant
    out: torch.Tensor  # [H_q, n, D]
    logit_den: float
    out_den: float
    scaling: float
    group: int


def first_scored(rule: PositionRule, t: int) -> int:
    """The first position < t whose query reads a key quantized under ``rule`` (t if none)."""
    pos = torch.arange(t)
    reads = torch.nonzero(rule.exact_from(pos) > rule.sink)
    return int(reads[0]) if len(reads) else t


def pair_masks(pos: torch.Tensor, t: int, windows: Windows | None) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [n, t] masks for queries at ``pos`` over keys 0..t-1: (causal, key read from the INT2 cache)."""
    keys = torch.arange(t, device=pos.device)
    causal = keys[None, :] <= pos[:, None]
    if windows is None:
        return causal, causal
    return causal, causal & ~windows.rule.exact(pos[:, None], keys[None, :])


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, windows: Windows | None,
            query_stride: int) -> _Prepared | None:
    """q [H_q, T, D], k/v [H_kv, T, D] of one sequence -> exact attention (None if no query scored)."""
    t = q.shape[1]
    g = q.shape[0] // k.shape[0]
    start = first_scored(windows.rule, t) if windows else 0
    pos = torch.arange(start, t, query_stride, device=q.device)
    if len(pos) == 0:
        return None
    causal, quant = pair_masks(pos, t, windows)
    qs = q.float()[:, pos]
    vx = v.float().repeat_interleave(g, 0)
    raw = (qs @ k.float().repeat_interleave(g, 0).transpose(1, 2) * scaling) * causal
    logits = raw.masked_fill(~causal, float("-inf"))
    probs = logits.softmax(-1)
    out, quant = probs @ vx, quant.float()
    return _Prepared(qs, vx, quant, logits, raw, probs, probs * quant, out, float((raw * quant).square().sum()),
                     float(out.square().sum()), scaling, g)


def errors(p: _Prepared, k_hat: torch.Tensor | None, v_hat: torch.Tensor | None) -> tuple[float, float, float, float]:
    """(logit num, logit den, output num, output den) with k̂ / v̂ [H_kv, T, D] (None = exact)."""
    ln = ld = 0.0
    out, probs_quant = p.out, p.probs_quant
    if k_hat is not None:
        diff = (p.q @ k_hat.repeat_interleave(p.group, 0).transpose(1, 2) * p.scaling - p.raw) * p.quant
        ln, ld = float(diff.square().sum()), p.logit_den
        probs = (p.logits + diff).softmax(-1)  # -inf stays -inf where not causal (diff is 0 there)
        out, probs_quant = probs @ p.v, probs * p.quant
    if v_hat is not None:
        out = out + probs_quant @ (v_hat.repeat_interleave(p.group, 0) - p.v)
    return ln, ld, float((out - p.out).square().sum()), p.out_den


@dataclass
class ErrorAccumulator:
    """Observer: per (candidate, layer, sequence) error sums for the report.

    ``sums[c][layer][seq] = [logit num, logit den, output num, output den]``.
    """

    candidates: list[Candidate]
    layout: RowLayout
    windows: Windows | None
    query_stride: int = 1
    sums: dict[str, dict[int, list[list[float]]]] = field(default_factory=dict)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
        for b in range(q.shape[0]):
            p = prepare(q[b], k[b], v[b], scaling, self.windows, self.query_stride)
            if p is None:
                continue
            for c in self.candidates:
                lk, lv = c.layouts(self.layout, layer)
                kh = quantize_through(k[b], c.key[layer], c.clip_k[layer], lk)
                vh = quantize_through(v[b], c.value[layer], c.clip_v[layer], lv)
                self.sums.setdefault(c.name, {}).setdefault(layer, []).append(list(errors(p, kh, vh)))

    def per_layer(self, name: str, kind: str = "output") -> list[float]:
        """Relative MSE per layer (ratio of sums over sequences); kind 'logit' or 'output'."""
        i = 0 if kind == "logit" else 2
        by_layer = self.sums[name]
        return [sum(s[i] for s in by_layer[l]) / max(sum(s[i + 1] for s in by_layer[l]), 1e-30)
                for l in sorted(by_layer)]

    def per_sequence(self, name: str) -> list[float]:
        """Attention-output relative MSE per sequence, averaged over layers (for paired statistics)."""
        by_layer = self.sums[name]
        n = len(next(iter(by_layer.values())))
        return [sum(by_layer[l][s][2] / max(by_layer[l][s][3], 1e-30) for l in by_layer) / len(by_layer)
                for s in range(n)]


@dataclass
class ClipSearch:
    """Observer: per-layer attention-output error of the keys (values exact) and of the values
    (keys exact) at every code width of ``widths`` and clip ratio of ``grid_k`` / ``grid_v``.

    The two errors add to first order, which keeps the cost linear in the grid. A one-ratio grid
    measures fixed clips. ``best`` picks each layer's ratio at the width it is stored with (a
    ratio that is best for 2-bit codes clips too much for 4-bit ones); ``per_layer`` gives the
    error of each width at its best ratio, the bit allocation's input.
    ``key``/``value``: rotations [L, D, D] or [L, H_kv, D, D].
    """

    key: torch.Tensor
    value: torch.Tensor
    layout: RowLayout
    windows: Windows | None
    grid_k: tuple[float, ...] = CLIP_GRID
    grid_v: tuple[float, ...] = CLIP_GRID
    widths: tuple[int, ...] = (2,)
    query_stride: int = 1
    k_err: dict[int, list[list[float]]] = field(default_factory=dict)  # layer -> [width][ratio]
    v_err: dict[int, list[list[float]]] = field(default_factory=dict)
    den: dict[int, float] = field(default_factory=dict)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
        ke = self.k_err.setdefault(layer, [[0.0] * len(self.grid_k) for _ in self.widths])
        ve = self.v_err.setdefault(layer, [[0.0] * len(self.grid_v) for _ in self.widths])
        for b in range(q.shape[0]):
            p = prepare(q[b], k[b], v[b], scaling, self.windows, self.query_stride)
            if p is None:
                continue
            self.den[layer] = self.den.get(layer, 0.0) + p.out_den
            for i, w in enumerate(self.widths):
                lay = self.layout.with_bits(w)
                for j, r in enumerate(self.grid_k):
                    ke[i][j] += errors(p, quantize_through(k[b], self.key[layer], r, lay), None)[2]
                for j, r in enumerate(self.grid_v):
                    ve[i][j] += errors(p, None, quantize_through(v[b], self.value[layer], r, lay))[2]

    def _check(self, num_layers: int) -> None:
        if len(self.den) != num_layers:
            raise ValueError("the clip search / bit allocation saw no scored queries: use sequences longer "
                             "than the first block after the sinks")

    def best(self, key_bits: list[int], value_bits: list[int]) -> tuple[list[float], list[float]]:
        """Per-layer argmin ratios (K, V) at each layer's (key, value) width."""
        self._check(len(key_bits))
        pick = lambda grid, e, w: grid[min(range(len(grid)), key=e[self.widths.index(w)].__getitem__)]  # noqa: E731
        return ([pick(self.grid_k, self.k_err[l], w) for l, w in enumerate(key_bits)],
                [pick(self.grid_v, self.v_err[l], w) for l, w in enumerate(value_bits)])

    def per_layer(self, num_layers: int) -> tuple[list[list[float]], list[list[float]]]:
        """(key, value) relative errors [layer][width], each width at its best ratio."""
        self._check(num_layers)
        rel = lambda e: [[min(x) / max(self.den[l], 1e-30) for x in e[l]] for l in range(num_layers)]  # noqa: E731
        return rel(self.k_err), rel(self.v_err)


def allocate_bits(key_err: list[list[float]], value_err: list[list[float]], layout: RowLayout,
                  budget: float) -> tuple[list[int], list[int]]:
    """Per-layer (key, value) widths minimising the summed attention-output error under ``budget``
    average physical bits per element (``CacheLayout.bits_per_element``); ``key_err[l][i]`` is
    layer l's error at width ``widths_for(head_dim)[i]``.

    Greedy over upgrades: start with every tensor at the narrowest width and repeatedly take the
    upgrade (one tensor of one layer to any wider width) with the largest error drop per byte
    that still fits; an upgrade that would not lower the error is never taken.
    """
    bits = widths_for(layout.head_dim)
    n = len(key_err)
    errs = key_err + value_err  # item i < n: keys of layer i; else values of layer i - n
    rows = [layout.with_bits(b).row_bytes for b in bits]
    cap = budget * 2 * n * layout.head_dim / 8.0  # bytes of all K+V rows of one token and KV head
    floor = CacheLayout.of(layout.head_dim, layout.group_size, [bits[0]] * n, [bits[0]] * n)
    if floor.token_row_bytes > cap + 1e-9:
        raise ValueError(f"--kv-bits {budget:g} is below the smallest layout: {floor.bits_per_element:g} bits per "
                         f"element at head_dim {layout.head_dim} (every key and value at {bits[0]} bits)")
    pick = [0] * (2 * n)
    used = floor.token_row_bytes
    while True:
        best = None
        for i, j in enumerate(pick):
            for w in range(j + 1, len(bits)):
                cost, gain = rows[w] - rows[j], errs[i][j] - errs[i][w]
                if gain > 0 and used + cost <= cap + 1e-9 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, i, w, cost)
        if best is None:
            return [bits[j] for j in pick[:n]], [bits[j] for j in pick[n:]]
        _, i, w, cost = best
        pick[i], used = w, used + cost
