"""`sglang serve --oscar` with real SmolLM2-135M weights (CPU, reference ops).

One BF16 server (torch_native, `python -m sglang.launch_server`) and one OSCAR server
(`sglang serve`) on the same held-out text:
- /generate and /v1/completions answer;
- input-token logprobs of OSCAR stay close to BF16 (paired per-token NLL difference).
  The rotations use blocks of 256 (sink 64), so a query of the ~1K-token text reads every key
  before its own block from the 2-bit rows (with the default 1024, the whole text would be
  one exact block);
- the frontend-language example (fork over questions about one document) runs;
- verbatim recall (benchmarks/recall_probe.py, small): codes embedded in a document that
  another request cached, asked back concurrently; BF16 recalls them, OSCAR's answers through
  the shared 2-bit document are identical when the whole probe is repeated (a mis-indexed or
  racy shared page would change them). The exact-match rates are printed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from statistics import mean

import pytest
import requests

from oscar_sglang.launch import serve
from oscar_sglang.testing import greedy_answers, logprob_gaps, weights_by_name



@pytest.fixture(scope="module")
def rotations(smollm2_dir, tmp_path_factory):
    from oscar_sglang.calib.__main__ import main

    out = tmp_path_factory.mktemp("rot") / "smollm2.safetensors"
    assert main(["--model", str(smollm2_dir), "--tokens", "2048", "--seq-len", "1024", "--block", "256",
                 "--out", str(out)]) == 0
    return out


SERVER_ARGS = ["--max-total-tokens", "8192", "--chunked-prefill-size", "128", "--disable-overlap-schedule",
               "--dtype", "float32", "--random-seed", "0"]


@pytest.fixture(scope="module")
def held_out_text():
    from oscar_sglang.calib.assets import essay_files

    return " ".join(p.read_text() for p in essay_files()[:3])[:4500]  # ~1K tokens, not calibration text


def _input_logprobs(url: str, text: str) -> list[float]:
    r = requests.post(f"{url}/generate", json={"text": text, "return_logprob": True, "logprob_start_len": 0,
                                               "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, timeout=600)
    r.raise_for_status()
    return [lp for lp, _, _ in r.json()["meta_info"]["input_token_logprobs"] if lp is not None]


@pytest.fixture(scope="module")
def bf16(smollm2_dir):
    # the two documented entry points: `python -m sglang.launch_server` (BF16) and `sglang serve` (OSCAR)
    with serve(smollm2_dir, [*SERVER_ARGS, "--attention-backend", "torch_native"], device="cpu",
               entry="launch_server") as s:
        yield s


@pytest.fixture(scope="module")
def oscar(smollm2_dir, rotations):
    with serve(smollm2_dir, [*SERVER_ARGS, "--oscar", str(rotations)], device="cpu", entry="sglang serve") as s:
        yield s


# Calibration (fixture) + two CPU server starts + ~1K-token prefills: ~8 min on an idle 2-core machine, more
# than the suite's 900 s per test when the cores are shared.
@pytest.mark.timeout(1800)
def test_oscar_server_matches_bf16_and_serves_frontend_programs(smollm2_dir, held_out_text, bf16, oscar):
    from benchmarks import recall_probe
    import shared_document_qa

    trials = recall_probe.build_trials(str(smollm2_dir), 1, 700, [0.1, 0.5, 0.9])
    ref = _input_logprobs(bf16.url, held_out_text)
    recall_bf16 = recall_probe.probe(bf16.url, trials)
    url = oscar.url
    # Same input tokens; keys before a query's block of 256 (but the first 64) are read 2-bit.
    assert len(got := _input_logprobs(url, held_out_text)) == len(ref) > 600
    diffs = [b - a for a, b in zip(got, ref)]  # per-token NLL(oscar) - NLL(bf16)
    mean = sum(diffs) / len(diffs)
    nll_bf16 = -sum(ref) / len(ref)
    print(f"\nSmolLM2 held-out NLL: BF16 {nll_bf16:.4f}, OSCAR - BF16 = {mean:+.4f} nats/token over {len(diffs)} tokens")
    assert abs(mean) < 0.05 * nll_bf16

    # a repeated prompt is read back from the (2-bit) radix cache in full (whole pages of 64)
    again = requests.post(f"{url}/generate", json={"text": held_out_text, "sampling_params": {"max_new_tokens": 1}},
                          timeout=300).json()
    assert again["meta_info"]["cached_tokens"] >= (len(ref) - 1) // 64 * 64

    comp = requests.post(f"{url}/v1/completions", json={"model": "default", "prompt": "The capital of France is",
                                                         "max_tokens": 8, "temperature": 0}, timeout=300)
    comp.raise_for_status()
    assert comp.json()["choices"][0]["text"].strip()

    # The first run's forks race the commit of the shared document (with BF16 too: some forks
    # prefill it cold, or from its first chunks). Asked again, every question reads it from the cache.
    for _ in range(2):
        answers, metas = shared_document_qa.run(url, held_out_text[:2000], max_tokens=12)
        assert len(answers) == len(shared_document_qa.QUESTIONS) and all(isinstance(a, str) for a in answers)
    print(f"QA over a cached document: prompt/cached tokens {[(m['prompt_tokens'], m['cached_tokens']) for m in metas]}")
    # at least the whole document: its pages up to the question (pages of 64 slots)
    assert all(m["cached_tokens"] >= m["prompt_tokens"] - 2 * 64 for m in metas)

    recall = [recall_probe.probe(url, trials) for _ in range(2)]
    rates = {name: recall_probe.summarize(rows)["exact_match"] for name, rows in (("bf16", recall_bf16),
                                                                                 ("oscar", recall[0]))}
    print(f"verbatim recall through a cached document (3 codes, ~700 tokens): {rates}")
    assert all(r["cached_tokens"] >= 600 for rows in (recall_bf16, *recall) for r in rows)
    assert rates["bf16"] >= 2 / 3
    assert [r["answer"] for r in recall[0]] == [r["answer"] for r in recall[1]]


@pytest.fixture(scope="module")
def tp3(smollm2_dir, rotations):
    """BF16 and OSCAR with `oscar-serve --tp 3` (one of SmolLM2's 3 KV heads per rank), started at once."""
    runs = {"bf16": ["--attention-backend", "torch_native"], "oscar": ["--oscar", str(rotations)]}
    with ExitStack() as stack, ThreadPoolExecutor(len(runs)) as pool:
        started = pool.map(lambda extra: stack.enter_context(
            serve(smollm2_dir, [*SERVER_ARGS, *extra, "--tp", "3"], device="cpu", timeout=900)), runs.values())
        yield dict(zip(runs, started))


@pytest.mark.timeout(1800)
def test_tensor_parallel_3_gives_the_tokens_of_one_process(bf16, oscar, tp3):
    """Prompts longer than the sink plus a block (64 + 256: most keys read 2-bit), on --tp 3 and
    --tp 1 with the same rotations file (per KV head): the same greedy tokens, and logprobs that
    move by a small fraction of what 2-bit quantization itself moves them (OSCAR vs BF16 at --tp 1).
    A 2-bit code near a rounding edge flips under any float noise (another prefill chunking does
    it too) and moves a few logprobs by up to ~1e-2, so the float noise BF16 --tp 3 shows is the
    wrong yardstick; a rank with a wrong rotation, rows or window would move them by the
    quantization error or more. Each rank logs the KV heads whose rotations it took, and the
    output projection every rank folded R_V into (gathered over the ranks) is the one process's."""
    from oscar_sglang.calib.assets import essay_files

    essay = " ".join(p.read_text() for p in essay_files()[3:5])
    texts = [essay[i * 1600:(i + 1) * 1600] for i in range(2)]  # ~370 tokens each
    got = {name: greedy_answers(server.url, texts) for name, server in
           (("bf16 tp1", bf16), ("oscar tp1", oscar), ("bf16 tp3", tp3["bf16"]), ("oscar tp3", tp3["oscar"]))}

    noise = logprob_gaps(got["bf16 tp3"], got["bf16 tp1"])
    quant = logprob_gaps(got["oscar tp1"], got["bf16 tp1"], same_tokens=False)
    gap = logprob_gaps(got["oscar tp3"], got["oscar tp1"])
    print(f"\nSmolLM2 logprob gaps (mean / max over {len(gap)} tokens): BF16 --tp 3 vs 1 {mean(noise):.1e} / "
          f"{max(noise):.1e}; OSCAR vs BF16 at --tp 1 {mean(quant):.1e} / {max(quant):.1e}; "
          f"OSCAR --tp 3 vs 1 {mean(gap):.1e} / {max(gap):.1e}")
    assert mean(gap) <= 0.1 * mean(quant)

    log = tp3["oscar"].log.read_text()
    for rank in range(3):
        assert f"TP{rank}] OSCAR: this rank uses the rotations of KV heads [{rank}] of the file's 3" in log
    one, three, plain = (weights_by_name(s.url, "model.layers.3.self_attn.o_proj.weight", 4)
                         for s in (oscar, tp3["oscar"], bf16))
    assert max(abs(a - b) for r1, r3 in zip(one, three) for a, b in zip(r1, r3)) < 1e-5
    assert max(abs(a - b) for r1, r0 in zip(one, plain) for a, b in zip(r1, r0)) > 1e-2  # folded, not the plain weights
