"""Rotation math (R = U·H·P) and the strict rotations-file loader."""

from __future__ import annotations

import json
import struct

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from oscar_sglang.calib.rotation import (bit_reversal, build_rotations, eigh_descending, hadamard,
                                         hadamard_rotation, oscar_rotation, permutation_matrix)
from oscar_sglang.calib.rotations import (FORMAT_VERSION, METADATA_KEY, BitAllocation, ModelFingerprint, Provenance,
                                          Recipe, RotationsError, RotationsMeta, Windows, fingerprint_from_hf_config,
                                          load_rotations, save_rotations)
from oscar_sglang.kernels.rule import PositionRule

L, H, D = 2, 2, 16


def random_cov(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * torch.logspace(0, 2, d, dtype=torch.float64)
    return x.T @ x / len(x)


def fingerprint(**kw) -> ModelFingerprint:
    base = dict(architecture="LlamaForCausalLM", num_layers=L, num_attention_heads=4, num_kv_heads=H, head_dim=D,
                rope_theta=10000.0, rope_scaling=None)
    return ModelFingerprint(**(base | kw))


def make_meta(granularity: str = "layer", **kw) -> RotationsMeta:
    base = dict(format_version=FORMAT_VERSION, model=fingerprint(), granularity=granularity, clip_k=[0.96] * L,
                clip_v=[0.92] * L, recipe=Recipe(name="oscar"),
                provenance=Provenance(data="test", token_sha256="0" * 64, num_tokens=10, seq_len=10,
                                      tool_version="test"))
    return RotationsMeta(**(base | kw))


def valid_tensors(granularity: str = "layer") -> dict[str, torch.Tensor]:
    c = torch.stack([torch.stack([random_cov(D, 2 * l + h) for h in range(H)]) for l in range(L)])
    r_k, r_v, _, _ = build_rotations(c, c.flip(0), "oscar", granularity, L, H, D)
    return {"key": r_k, "value": r_v}


def edited(meta: RotationsMeta, old: str, new: str) -> str:
    """The metadata JSON with ``old`` replaced (which must occur, so a case never builds a valid file)."""
    raw = msgspec.json.encode(meta).decode()
    assert old in raw, (old, raw)
    return raw.replace(old, new)


def write_raw(path, tensors, meta) -> None:
    """Write a file bypassing save_rotations' validation (to build malformed files)."""
    md = None if meta is None else {METADATA_KEY: meta if isinstance(meta, str) else msgspec.json.encode(meta).decode()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)


# ------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_hadamard_orthogonal_and_symmetric(d):
    h = hadamard(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full_like(h, d**-0.5))


@pytest.mark.parametrize("d", [0, 3, 24, 96])
def test_hadamard_needs_power_of_two(d):
    with pytest.raises(ValueError, match="power of two"):
        hadamard(d)


@pytest.mark.parametrize("d", [2, 8, 64, 128])
def test_bit_reversal_is_a_permutation_and_involution(d):
    perm = bit_reversal(d)
    assert sorted(perm.tolist()) == list(range(d))
    assert torch.equal(perm[perm], torch.arange(d))
    p = permutation_matrix(perm)
    assert torch.equal(p.sum(0), torch.ones(d, dtype=torch.float64)) and torch.equal(p.sum(1), p.sum(0))
    y = torch.arange(d, dtype=torch.float64)
    assert torch.equal(y @ p, y[perm])
    assert bit_reversal(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]


def test_eigh_descending():
    c = random_cov(D)
    evals, u = eigh_descending(c)
    assert (evals[:-1] >= evals[1:]).all()
    assert torch.allclose(u @ torch.diag(evals) @ u.T, c, atol=1e-9 * c.abs().max())


@pytest.mark.parametrize("d", [16, 64, 128])
def test_oscar_rotation_equalises_the_diagonal(d):
    c = random_cov(d, seed=d)
    r, evals = oscar_rotation(c, bit_reversal_perm=False)  # R = U·H
    assert torch.allclose(r.T @ r, torch.eye(d, dtype=torch.float64), atol=1e-10)
    diag = torch.diagonal(r.T @ c @ r)  # = diag(Hᵀ Λ H)
    assert torch.allclose(diag, torch.full_like(diag, float(torch.trace(c)) / d), rtol=1e-9)
    assert not torch.allclose(torch.diagonal(c), diag, rtol=0.1)  # the input was far from equal
    r_p, _ = oscar_rotation(c)  # with P the diagonal is only permuted
    assert torch.allclose(torch.diagonal(r_p.T @ c @ r_p), diag, rtol=1e-9)
    assert torch.allclose(r_p, r @ permutation_matrix(bit_reversal(d)))


@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
@pytest.mark.parametrize("recipe", ["oscar", "hadamard", "identity"])
def test_build_rotations_shapes_and_orthogonality(recipe, granularity):
    c = torch.stack([torch.stack([random_cov(D, l * H + h) for h in range(H)]) for l in range(L)])
    r_k, r_v, e_k, e_v = build_rotations(c, c, recipe, granularity, L, H, D)
    lead = (L, H) if granularity == "kv-head" else (L,)
    assert r_k.shape == r_v.shape == (*lead, D, D) and r_k.dtype == torch.float32
    eye = torch.eye(D).expand(*lead, D, D)
    assert torch.allclose(r_k.transpose(-1, -2) @ r_k, eye, atol=1e-5)
    assert (e_k is None) == (recipe != "oscar")
    if recipe == "hadamard":
        assert torch.allclose(r_k[0].double(), hadamard_rotation(D), atol=1e-7)
    if recipe == "oscar" and granularity == "layer":  # per-layer C is the mean over KV heads
        want, _ = oscar_rotation(c[1].mean(0))
        assert torch.allclose(r_k[1].double(), want, atol=1e-5)


# ------------------------------------------------------------------------------ fingerprint
def test_fingerprint_from_hf_config():
    from transformers import LlamaConfig, Qwen2Config

    fp = fingerprint_from_hf_config(LlamaConfig(hidden_size=256, num_attention_heads=8, num_hidden_layers=3))
    assert (fp.architecture, fp.num_layers, fp.num_kv_heads, fp.head_dim) == ("llama", 3, 8, 32)  # KV heads absent
    assert fp.rope_theta == 10000.0 and fp.rope_scaling is None
    cfg = Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                      architectures=["Qwen2ForCausalLM"])
    fp = fingerprint_from_hf_config(cfg)
    assert (fp.architecture, fp.num_kv_heads, fp.rope_theta) == ("Qwen2ForCausalLM", 2, 5e5)
    assert json.loads(fp.rope_scaling) == {"factor": 2.0, "rope_type": "linear"}

    class Legacy:  # transformers 4.x style: rope_theta attribute, head_dim absent
        architectures = ["MistralForCausalLM"]
        num_attention_heads, num_hidden_layers, hidden_size, rope_theta, rope_scaling = 4, 2, 64, 1e6, None

    fp = fingerprint_from_hf_config(Legacy())
    assert (fp.num_kv_heads, fp.head_dim, fp.rope_theta, fp.rope_scaling) == (4, 16, 1e6, None)


# ----------------------------------------------------------------------------- file format
@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
def test_round_trip(tmp_path, granularity):
    t = valid_tensors(granularity)
    ev = torch.rand(*t["key"].shape[:-1]).sort(-1, descending=True).values
    meta = make_meta(granularity, windows=Windows(sink=4, block=16, first=0))
    path = save_rotations(tmp_path / "r.safetensors", t["key"], t["value"], meta, ev, ev)
    rot = load_rotations(path, expect=fingerprint())
    assert rot.meta == meta and torch.equal(rot.key, t["key"]) and torch.equal(rot.value, t["value"])
    assert torch.equal(rot.key_eigenvalues, ev)
    k, v = rot.for_layer(1)
    assert torch.equal(k, t["key"][1]) and torch.equal(v, t["value"][1])
    raw = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert list(raw["__metadata__"]) == [METADATA_KEY]  # exactly one metadata key, no pickle
    stored = json.loads(raw["__metadata__"][METADATA_KEY])
    assert stored["format_version"] == FORMAT_VERSION == 2 and stored["windows"] == {"sink": 4, "block": 16, "first": 0}
    assert rot.meta.windows.rule == PositionRule(sink=4, block=16)
    assert raw["key"]["dtype"] == "F32"
    assert rot.meta.bits is None and rot.meta.key_bits == rot.meta.value_bits == [2] * L  # files written before widths were recorded


def test_bit_allocation_round_trip(tmp_path):
    t = valid_tensors()
    bits = BitAllocation(key_bits=[4, 2], value_bits=[2, 4], budget=3.25, widths=[2, 4],
                         key_error=[[0.5, 0.01], [0.2, 0.02]], value_error=[[0.1, 0.01], [0.3, 0.03]])
    meta = make_meta(bits=bits)
    rot = load_rotations(save_rotations(tmp_path / "r.safetensors", t["key"], t["value"], meta))
    assert rot.meta == meta and (rot.meta.key_bits, rot.meta.value_bits) == ([4, 2], [2, 4])


def test_windows_hold_the_block_rule():
    assert Windows.__struct_fields__ == ("sink", "block", "first")
    assert Windows() == Windows(sink=64, block=1024, first=128) == make_meta().windows  # the served default
    assert Windows().rule == PositionRule() == PositionRule(sink=64, block=1024, recent=0, first=128)
    assert Windows(sink=0, block=256).rule.rebuildable
    with pytest.raises(ValueError, match="a position rule needs"):
        Windows(sink=64, block=0).rule
    with pytest.raises(msgspec.ValidationError, match="unknown field `recent`"):  # version 1's field
        msgspec.json.decode(b'{"sink": 64, "recent": 256}', type=Windows)


def test_save_refuses_invalid_rotations(tmp_path):
    t = valid_tensors()
    with pytest.raises(RotationsError, match="not orthogonal"):
        save_rotations(tmp_path / "r.safetensors", t["key"] * 2, t["value"], make_meta())
    assert not (tmp_path / "r.safetensors").exists()


def _malformed(tmp_path, case: str):
    path = tmp_path / f"{case}.safetensors"
    t, meta = valid_tensors(), make_meta()
    if case == "missing file":
        return path
    if case == "wrong shapes":
        write_raw(path, {"key": t["key"][:1], "value": t["value"]}, meta)
    elif case == "wrong dtype":
        write_raw(path, {"key": t["key"].double(), "value": t["value"]}, meta)
    elif case == "granularity vs shape":
        write_raw(path, t, make_meta("kv-head"))
    elif case == "non-orthogonal":
        bad = t["key"].clone()
        bad[1, 0, 0] += 0.01
        write_raw(path, {"key": bad, "value": t["value"]}, meta)
    elif case == "non-finite":
        bad = t["value"].clone()
        bad[1, 3, 3] = float("nan")
        write_raw(path, {"key": t["key"], "value": bad}, meta)
    elif case == "missing tensor":
        write_raw(path, {"key": t["key"]}, meta)
    elif case == "extra tensor":
        write_raw(path, t | {"bias": torch.zeros(3)}, meta)
    elif case == "missing metadata":
        write_raw(path, t, None)
    elif case == "garbled metadata":
        write_raw(path, t, f'{{"format_version": {FORMAT_VERSION}, "model": {{"architecture": ')
    elif case == "metadata wrong type":
        write_raw(path, t, edited(meta, '"granularity":"layer"', '"granularity":7'))
    elif case == "wrong version":
        write_raw(path, t, edited(meta, f'"format_version":{FORMAT_VERSION}', '"format_version":99'))
    elif case == "version 1 file":  # as oscar-sglang wrote it before the block rule: sliding windows
        v1 = edited(meta, '"windows":{"sink":64,"block":1024,"first":128}', '"windows":{"sink":64,"recent":256}')
        write_raw(path, t, v1.replace(f'"format_version":{FORMAT_VERSION}', '"format_version":1'))
    elif case == "version 2 with a recent window":
        write_raw(path, t, edited(meta, '"windows":{"sink":64,"block":1024,"first":128}', '"windows":{"sink":64,"recent":256}'))
    elif case == "clip list length":
        write_raw(path, t, make_meta(clip_k=[0.96]))
    elif case == "bit list length":
        write_raw(path, t, make_meta(bits=BitAllocation(key_bits=[2], value_bits=[2, 2])))
    elif case == "unsupported width":
        write_raw(path, t, make_meta(bits=BitAllocation(key_bits=[2, 8], value_bits=[2, 2])))
    elif case == "3 bits at head_dim 16":
        write_raw(path, t, make_meta(bits=BitAllocation(key_bits=[3, 2], value_bits=[2, 2])))
    elif case == "error table shape":
        write_raw(path, t, make_meta(bits=BitAllocation(key_bits=[2, 2], value_bits=[2, 2], widths=[2, 4],
                                                        key_error=[[0.1], [0.1]])))
    elif case == "truncated":
        write_raw(path, t, meta)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "truncated header":
        write_raw(path, t, meta)
        path.write_bytes(path.read_bytes()[:50])
    elif case == "not safetensors":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    return path


MALFORMED = {
    "missing file": "not found; create it with",
    "wrong shapes": r"tensor 'key' has shape \[1, 16, 16\] but the metadata .* requires \[2, 16, 16\]",
    "wrong dtype": "has dtype torch.float64, expected torch.float32",
    "granularity vs shape": r"granularity 'kv-head'.* requires \[2, 2, 16, 16\]",
    "non-orthogonal": r"tensor 'key' layer 1 is not orthogonal: max\|R\^T R - I\|",
    "non-finite": "tensor 'value' has non-finite values \\(first in layer 1\\)",
    "missing tensor": r"missing tensor\(s\) \['value'\]",
    "extra tensor": r"unexpected tensor\(s\) \['bias'\]",
    "missing metadata": "has no 'oscar_sglang.rotations' metadata",
    "garbled metadata": "metadata 'oscar_sglang.rotations' is garbled",
    "metadata wrong type": "is garbled .*granularity",
    "wrong version": "format_version 99 is not supported",
    "version 1 file": r"format_version 1 is not supported \(this oscar-sglang reads version 2\); recalibrate with",
    "version 2 with a recent window": "metadata 'oscar_sglang.rotations' is garbled .*unknown field `recent`",
    "clip list length": "clip_k has 1 entries, expected one per layer",
    "bit list length": r"bits.key_bits has 1 entries, expected one per layer \(2\)",
    "unsupported width": r"bits.key_bits has widths \[8\]; supported: \[2, 3, 4\]",
    "3 bits at head_dim 16": "3-bit rows need head_dim a multiple of 32",
    "error table shape": r"bits.key_error must be \[layers\]\[len\(bits.widths\)\]",
    "truncated": "truncated or corrupt",
    "truncated header": "is truncated or not a safetensors file",
    "not safetensors": "not a safetensors file",
    "empty": "not a safetensors file: only 0 bytes",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_give_one_clear_error(tmp_path, case):
    path = _malformed(tmp_path, case)
    with pytest.raises(RotationsError, match=MALFORMED[case]) as err:
        load_rotations(path)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value)


def test_model_mismatch_names_every_differing_field(tmp_path):
    t = valid_tensors()
    path = save_rotations(tmp_path / "r.safetensors", t["key"], t["value"], make_meta())
    load_rotations(path, expect=fingerprint())  # matches
    other = fingerprint(num_layers=24, head_dim=64, rope_theta=1e6)
    with pytest.raises(RotationsError, match="calibrated for a different model") as err:
        load_rotations(path, expect=other)
    msg = str(err.value)
    assert "rotations are for 2 layers, model has 24" in msg
    assert "rotations are for head_dim 16, model has 64" in msg
    assert "rope_theta 10000.0" in msg and "num_kv_heads" not in msg
