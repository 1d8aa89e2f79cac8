"""sglang.Engine (the in-process entry point) end to end on CPU with a tiny random Llama and
--oscar (real sglang, reference ops). The HTTP servers of test_parallel.py compare OSCAR with BF16
(a prompt inside the sink and first block gets BF16's tokens); here one engine start covers the
Python API: generation, radix-cache hits and warm == cold.
"""

from __future__ import annotations

import time

import pytest

from oscar_sglang.testing import write_rotations, write_tiny_model

ENGINE_ARGS = dict(load_format="dummy", skip_tokenizer_init=True, device="cpu", disable_overlap_schedule=True,
                   max_total_tokens=2048, dtype="float16", log_level="error", random_seed=0)
GREEDY = {"max_new_tokens": 8, "temperature": 0}
PROMPTS = [list(range(5, 41)), list(range(100, 123)), [7] * 9 + list(range(300, 331))]


def _flush(engine, timeout: float = 120) -> None:
    """flush_cache is refused while the scheduler still holds a just-finished request: retry until idle."""
    deadline = time.monotonic() + timeout
    while not engine.flush_cache().success:
        assert time.monotonic() < deadline, f"flush_cache refused for {timeout:.0f} s: scheduler never idle"
        time.sleep(0.5)


def _generate(engine, prompts, params=GREEDY):
    out = engine.generate(input_ids=prompts, sampling_params=params)
    return [o["output_ids"] for o in out], [o["meta_info"]["cached_tokens"] for o in out]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _engine(model_dir, **kw):
    import sglang as sgl

    return sgl.Engine(model_path=str(model_dir), **{**ENGINE_ARGS, **kw})


def test_int2_prefix_cache_hits_and_determinism(model_dir, tmp_path):
    """A tiny rule (sink 4, blocks of 16, pages of 16): most of each prompt is read back from INT2 rows."""
    rot = write_rotations(tmp_path / "rot.safetensors", model_dir, sink=4, block=16)
    engine = _engine(model_dir, attention_backend="oscar", quantization_param_path=str(rot), max_total_tokens=65536)
    page = engine.get_server_info()["page_size"]
    assert page == 16
    try:
        first, cached = _generate(engine, PROMPTS)
        assert cached == [0, 0, 0]
        assert all(len(t) == GREEDY["max_new_tokens"] for t in first)
        # The same prompts again hit the radix cache, twice. The position rule makes the
        # quantized model one function of the tokens: warm == cold, token for token.
        again, cached_again = _generate(engine, PROMPTS)
        third, cached_third = _generate(engine, PROMPTS)
        assert all(c >= (len(p) - 1) // page * page for c, p in zip(cached_again, PROMPTS)), cached_again
        assert again == first and third == first and cached_third == cached_again
        # A longer prompt sharing the first prefix extends it; batch vs alone agree.
        longer = PROMPTS[0] + [50, 51, 52, 53]
        alone, hit = _generate(engine, [longer])
        assert hit[0] >= len(PROMPTS[0]) // page * page
        batched, _ = _generate(engine, [longer, PROMPTS[1]])
        assert batched[0] == alone[0]
        _flush(engine)
    finally:
        engine.shutdown()
