"""Quality evaluation (oscar_sglang.eval): simulation semantics, metrics and a small end-to-end run.

- the chunked attention of the simulation equals a per-query reference that picks exact or
  quantized keys one by one (prefill chunks, decode steps, block / sliding / combined position
  rules, KIVI groups);
- a small end-to-end run of the CLI (random 2-layer Llama with SmolLM2's tokenizer, a few hundred
  essay tokens): BF16 vs itself gives KL 0 and top-1 1.0;
  windows covering every token give BF16 exactly; every quantized method has KL > 0, and naive
  INT2 without windows is worse than with windows; several ``--rules`` name each windowed method
  METHOD@RULE and pair it against the first rule.
The served path is exercised by the SmolLM2 evaluation itself (see README), not here: two CPU
server starts do not fit this file's time budget.
"""

from __future__ import annotations

import json

import pytest
import torch

from oscar_sglang.calib.metrics import Candidate
from oscar_sglang.calib.rotations import load_rotations
from oscar_sglang.eval.methods import Method, attend, chunk_starts
from oscar_sglang.eval.metrics import paired, windowed
from oscar_sglang.eval.tasks import Probe, matched_prefix, matched_tokens, score
from oscar_sglang.kernels.rule import PositionRule

L, D = 2, 32


def _quantized(method: Method, i: int, start: int) -> range:
    """Keys the query at i (its chunk starting at ``start``) reads quantized, from the definitions:
    rows: keys from the sinks up to the rule's first exact key (t // W * W for a block W, t - R + 1
    for a sliding window R, the earlier for both; every key without a rule); KIVI: whole key groups
    older than the residual counted from the chunk start."""
    if method.kind == "row":
        r = method.rule
        if r is None:
            return range(0, i + 1)
        ends = ([i // r.block * r.block] if r.block else []) + ([i - r.recent + 1] if r.recent else [])
        return range(r.sink, min(ends))
    return range(0, max(start - method.recent, 0) // method.group * method.group)


def _reference(method: Method, layer: int, q, k, v, scaling: float, starts: torch.Tensor) -> torch.Tensor:
    """Query by query: key j is read quantized iff j is in :func:`_quantized` of the query."""
    kq, vq = method.quantize(layer, k, v, k.shape[1])
    kq, vq = torch.cat([kq, k[:, kq.shape[1]:]], 1), torch.cat([vq, v[:, vq.shape[1]:]], 1)  # kivi: whole groups
    g = q.shape[0] // k.shape[0]
    out = torch.empty_like(q)
    for i in range(q.shape[1]):
        quant = _quantized(method, i, int(starts[i]))
        use_q = (torch.arange(i + 1) >= quant.start) & (torch.arange(i + 1) < quant.stop)
        kk = torch.where(use_q[None, :, None], kq[:, : i + 1], k[:, : i + 1]).repeat_interleave(g, 0)
        vv = torch.where(use_q[None, :, None], vq[:, : i + 1], v[:, : i + 1]).repeat_interleave(g, 0)
        p = (q[:, i : i + 1] @ kk.transpose(1, 2) * scaling).softmax(-1)
        out[:, i] = (p @ vv)[:, 0]
    return out


def _methods() -> list[Method]:
    g = torch.Generator().manual_seed(0)
    rot = torch.linalg.qr(torch.randn(L, 2, D, D, generator=g))[0]  # per KV head
    eye = torch.eye(D).expand(L, D, D)
    cand = Candidate("o", rot, rot.flip(1), [0.9] * L, [0.8] * L)
    # block 24: not a multiple of the chunks (16, 7), so blocks and chunks cross
    return [Method("naive", "row", Candidate("n", eye, eye, [1.0] * L, [1.0] * L)),
            Method("oscar-block", "row", cand, PositionRule(sink=5, block=24)),
            Method("oscar-sliding", "row", cand, PositionRule(sink=5, block=0, recent=11)),
            Method("oscar-both", "row", cand, PositionRule(sink=5, block=24, recent=11)),
            Method("kivi", "kivi", recent=13, group=D)]


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.name)
@pytest.mark.parametrize("chunk,prompt", [(16, 100), (7, 60), (1000, 120)])
def test_chunked_attention_matches_per_query_reference(method, chunk, prompt):
    g = torch.Generator().manual_seed(1)
    t = 120
    q, k, v = (torch.randn(h, t, D, generator=g) for h in (4, 2, 2))
    k[:, :, 3] *= 8  # an outlier channel, so that quantization error is visible
    starts = chunk_starts(prompt, t, chunk)  # prompt in chunks, then decode steps
    got = attend(method, 1, q, k, v, 0.2, starts)
    want = _reference(method, 1, q, k, v, 0.2, starts)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    exact = attend(Method("x", "row", method.rot, PositionRule(sink=t)) if method.rot
                   else Method("x", "kivi", recent=t, group=D), 1, q, k, v, 0.2, starts)
    err = (got - exact).abs().max()
    # rotated rows follow the position rule (keys before the query's block or window are quantized
    # inside one chunk too); KIVI's residual is chunk-aligned, so it sees quantization only across chunks
    assert err > 1e-3 if prompt > chunk or method.kind == "row" else err == 0


def test_kivi_keys_are_quantized_per_channel_over_token_groups():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 70, D, generator=g), torch.randn(2, 70, D, generator=g)
    kq, vq = Method("kivi", "kivi", recent=0, group=D).quantize(0, k, v, 64)
    assert kq.shape == (2, 64, D) and vq.shape == (2, 64, D)
    per_channel_levels = torch.tensor([len(kq[h, a : a + D, c].unique()) for h in range(2) for c in range(D)
                                       for a in (0, D)])  # one scale/min per channel and group of D tokens
    assert per_channel_levels.max() <= 4 and per_channel_levels.min() >= 2
    assert max(len(vq[h, t].unique()) for h in range(2) for t in range(64)) <= 4


def test_statistics_helpers():
    assert paired([1.0, 3.0]) == (2.0, 1.0)
    assert windowed([1.0] * 5 + [3.0], window=4) == [1.0, 2.0]
    assert matched_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert matched_tokens([1, 2, 9, 4], [1, 2, 3, 4]) == 3
    assert [score(Probe(kind, 8, 0.5, [0], [1, 2, 3, 4]), [1, 2, 9, 4]) for kind in ("needle", "recall")] == [2, 3]


@pytest.fixture(scope="module")
def tiny_model(smollm2_dir, tmp_path_factory):
    """A random 2-layer Llama (oscar_sglang.testing geometry) with SmolLM2's tokenizer, saved as a checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from oscar_sglang.testing import TINY_CONFIG

    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = {**TINY_CONFIG, "vocab_size": len(tok), "torch_dtype": "float32"}
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run(model, out, *extra):
    """The eval on the tiny model; the default rotations are calibrated once per directory."""
    from oscar_sglang.calib.cli import main as calib_main
    from oscar_sglang.eval.__main__ import main

    rot = out / "rot.safetensors"
    if not rot.exists():
        assert calib_main(["--model", str(model), "--out", str(rot), "--tokens", "256", "--seq-len", "256",
                           "--no-search-clip", "--sink", "16", "--block", "64"]) == 0  # small: covariances only
    args = ["--model", str(model), "--out-dir", str(out), "--contexts", "160", "320", "--needle-lengths", "256",
            "--needle-depths", "0.5", "--recall-lengths", "256", "--recall-depths", "0.4", "--chunk", "64",
            "--rot-default", str(rot), "--rot-published", str(rot), "--no-served", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())["rows"]["sim"]


def test_small_evaluation_orders_methods(tiny_model, tmp_path):
    sim = _run(tiny_model, tmp_path, "--sink", "16", "--rules", "block:64")  # one rule: plain method names
    assert set(sim) == {"bf16", "naive", "naive-win", "kivi", "hadamard", "oscar-published", "oscar-default"}
    assert sim["bf16"]["kl"][0] == 0 and sim["bf16"]["top1"] == 1.0 and sim["bf16"]["dnll"][0] == 0
    assert sim["naive"]["kl"][0] > sim["naive-win"]["kl"][0] > 0  # windows help
    assert all(sim[m]["kl"][0] > 0 and sim[m]["top1"] < 1.0 for m in sim if m != "bf16")
    for f in ("quality.md", "quality.csv", "quality.png", "pareto.png"):
        assert (tmp_path / f).stat().st_size > 0
    bits = load_rotations(tmp_path / "rot.safetensors").meta.bits  # the default widths: keys 3, values 2
    assert (bits.key_bits, bits.value_bits, bits.budget) == ([3, 3], [2, 2], None)
    table = (tmp_path / "quality.md").read_text()
    assert "| sim | bf16 | 16 (16) |" in table and "| sim | naive | 3 (2.25) |" in table
    assert "| sim | oscar-default | 3.5 (2.75) |" in table


def test_windows_covering_every_token_equal_bf16(tiny_model, tmp_path):
    sim = _run(tiny_model, tmp_path, "--methods", "bf16", "oscar-default", "naive-win", "--sink", "4096",
               "--variant", f"same={tmp_path / 'rot.safetensors'}")
    assert sim["same"] == sim["oscar-default"]  # a --variant is quantized like the OSCAR methods
    for m in ("oscar-default", "naive-win"):
        assert sim[m]["kl"][0] < 1e-9 and sim[m]["top1"] == 1.0 and abs(sim[m]["dnll"][0]) < 1e-6
        assert sim[m]["needle"] == sim["bf16"]["needle"] and sim[m]["recall"] == sim["bf16"]["recall"]


def test_several_rules_name_each_windowed_method_and_pair_them(tiny_model, tmp_path):
    sim = _run(tiny_model, tmp_path, "--methods", "bf16", "naive", "naive-win", "oscar-default", "--sink", "4",
               "--rules", "block:8", "sliding:4")
    windowed_methods = [f"{m}@{r}" for m in ("naive-win", "oscar-default") for r in ("block8", "sliding4")]
    assert set(sim) == {"bf16", "naive", *windowed_methods}  # bf16 and naive read no full-precision keys: one row
    assert sim["naive-win@block8"]["kl"] != sim["naive-win@sliding4"]["kl"]  # each row under its own rule
    assert all(sim[m]["kl"][0] > 0 for m in windowed_methods)
    table = (tmp_path / "quality.md").read_text()
    assert "| sim | naive-win@sliding4 | 3 (2.25) |" in table and "| sim | oscar-default@block8 | 3.5 (2.75) |" in table
    _, found, pairs = table.partition("Paired against the same method under block8:")
    assert found and "| method | ΔNLL (nats) | ΔKL (nats) | Δneedle (pts) | Δrecall (pts) |" in pairs
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in pairs.splitlines()
            if line.startswith("| ") and "@" in line}
    assert set(rows) == {"naive-win@sliding4", "oscar-default@sliding4"}  # the first rule is the reference
    for m in ("naive-win", "oscar-default"):
        a, b = sim[f"{m}@sliding4"], sim[f"{m}@block8"]
        # paired over the same windows, the mean differences are those of the rows against BF16
        dnll, dkl = (float(cell.split(" ± ")[0]) for cell in rows[f"{m}@sliding4"][:2])
        assert dnll == pytest.approx(a["dnll"][0] - b["dnll"][0], abs=1e-4)
        assert dkl == pytest.approx(a["kl"][0] - b["kl"][0], abs=1e-4)


@pytest.mark.parametrize("args,why", [
    (["--served", "--rules", "block:8", "sliding:4"],
     "--served evaluates the rotations files' own rule: give one --rules"),
    (["--rules", "block:8x"], "expected block:W, block:W/F, sliding:R or block:W+sliding:R"),
    (["--rules", "block:0"], "a position rule needs"),
])
def test_bad_rules_are_refused_before_any_work(args, why, tmp_path, capsys):
    from oscar_sglang.eval.__main__ import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # the model does not exist: a later refusal would name it
        main(["--model", str(tmp_path / "no-model"), "--out-dir", str(out), *args])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written (the directory may be made first)


@pytest.mark.parametrize("spec,why", [("bf16=x.safetensors", "already taken"), ("noequals", "expected NAME="),
                                      ("v=/nonexistent.safetensors", "no such file")])
def test_bad_variants_are_refused_before_any_work(spec, why, tmp_path, capsys):
    from oscar_sglang.eval.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "no-model"), "--out-dir", str(tmp_path / "out"), "--variant", spec])
    assert e.value.code == 2 and why in capsys.readouterr().err and not (tmp_path / "out").exists()
