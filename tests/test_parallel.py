"""sglang's parallel modes with --oscar on its CPU engine (oscar_sglang.cpu.parallel), end to end.

A tiny Llama with real weights (4 query heads, ONE KV head: ``--tp 2`` has more ranks than KV
heads), served by real `oscar-serve --device cpu` processes, all started at once:

- BF16 (torch_native) ``--tp 1`` and ``--tp 2``: the float noise tensor parallelism adds;
- OSCAR ``--tp 1``; OSCAR ``--tp 2`` over two nodes (two processes, ``--nnodes 2 --node-rank 0/1
  --dist-init-addr`` on loopback); OSCAR ``--pp-size 2`` (one layer per stage);
- a Qwen3-MoE geometry (GQA attention over MoE layers, dummy weights) with --oscar: served, and
  its radix cache reused with warm == cold.

On prompts longer than the sink plus a block (sink 4, blocks of 16: most keys are read 2-bit),
every parallel OSCAR server gives the greedy tokens of OSCAR ``--tp 1``, with logprobs that move
by a small fraction of what quantization moves them (BF16 ``--tp 2`` vs ``--tp 1`` is printed as
the float noise tensor parallelism adds; pipeline stages add no arithmetic: the same logprobs).
A prompt inside the sink and first block gets BF16's tokens from OSCAR (every key read in full
precision). The rotations are per KV head; with one KV head over two ranks sglang's CPU engine pads the KV
heads to two (the padded head's weights are zero, its rotation the identity: ``fold.rank_rotations``).
The folded output projection read back from the two-node server (gathered over both ranks)
equals OSCAR ``--tp 1``'s.
"""

from __future__ import annotations

import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from statistics import mean

import pytest

from oscar_sglang import cpu
from oscar_sglang.cpu import parallel
from oscar_sglang.launch import ENTRIES, free_port, serve
from oscar_sglang.testing import (greedy_answers, logprob_gaps, weights_by_name, write_rotations, write_tiny_model,
                                  write_tiny_real_model)

from benchmarks import stress

ARGS = ["--skip-tokenizer-init", "--disable-overlap-schedule", "--random-seed", "0", "--page-size", "16",
        "--max-total-tokens", "4096", "--dtype", "float32"]
NEW = 8


# ------------------------------------------------------------------ the CPU workarounds, unit by unit
def test_ranks_follow_sglang_flags_and_aliases():
    assert parallel.ranks(["--model-path", "m"]) == (1, 1)
    assert parallel.ranks(["--tp", "3"]) == (3, 3)
    assert parallel.ranks(["--tp-size=2", "--pp-size", "2"]) == (4, 4)
    assert parallel.ranks(["--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1"]) == (2, 1)
    assert parallel.ranks(["--dp", "2", "--tp", "2"]) == (4, 4)


def test_thread_binding_splits_the_cores_over_the_ranks():
    assert parallel.thread_binding([0, 1], 3) == "0|1|0"  # more ranks than cores: shared
    assert parallel.thread_binding([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert parallel.thread_binding([7, 3, 5, 1], 2) == "1,3|5,7"
    assert parallel.thread_binding(range(8), 1) == "0,1,2,3,4,5,6,7"


def test_environment_binds_threads_only_where_sglang_needs_it(monkeypatch):
    monkeypatch.setattr(parallel, "numa_nodes", lambda: 1)
    base = {"PYTHONPATH": str(cpu.STANDIN), cpu.ENGINE_VARIABLE[0]: cpu.ENGINE_VARIABLE[1]}
    assert cpu.environment(base, ["--model-path", "m"]) is None  # one rank: sglang's default NUMA binding
    tp3 = cpu.environment(base, ["--tp", "3"])
    assert tp3[parallel.BIND_VARIABLE].count("|") == 2 and tp3[parallel.THREADS_VARIABLE] == "1"
    assert cpu.environment({**base, parallel.THREADS_VARIABLE: "4"}, ["--tp", "3"])[parallel.THREADS_VARIABLE] == "4"
    node1 = cpu.environment(base, ["--tp", "2", "--nnodes", "2", "--node-rank", "1"])
    assert "|" not in node1[parallel.BIND_VARIABLE]  # this machine's one rank (sglang counts both nodes')
    assert cpu.environment({**base, parallel.BIND_VARIABLE: "0|0|1"}, ["--tp", "3"]) is None  # the user's is kept
    monkeypatch.setattr(parallel, "numa_nodes", lambda: 4)
    assert cpu.environment(base, ["--tp", "3"]) is None


def test_groups_are_built_without_pynccl():
    import inspect

    from sglang.srt.distributed import parallel_state

    assert "use_pynccl" in inspect.signature(inspect.unwrap(parallel_state.init_model_parallel_group)).parameters
    seen = {}
    parallel.groups_without_pynccl(lambda *a, **kw: seen.update(kw), [[0, 1]], 0, "gloo", use_pynccl=True)
    assert seen["use_pynccl"] is False
    targets = {t for t, _, _ in parallel.HOOKS}
    assert targets == {"sglang.srt.distributed.parallel_state.init_model_parallel_group"}


# ------------------------------------------------------------------ real servers
@contextmanager
def _follower(model, args):
    """Node rank 1 of a two-node launch: no HTTP API of its own (rank 0's stops it)."""
    proc = subprocess.Popen([*ENTRIES["oscar-serve"], "--model-path", str(model), "--port", str(free_port()),
                             "--device", "cpu", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    # weights 20x the usual init scale: peaked next-token distributions, so greedy choices are not
    # near-ties that float noise alone would flip
    model = write_tiny_real_model(tmp / "tiny", num_key_value_heads=1, initializer_range=0.4)
    rot = write_rotations(tmp / "rot.safetensors", model, sink=4, block=16, granularity="kv-head")
    moe = write_tiny_model(tmp / "moe", architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
                           norm_topk_prob=True)
    moe_rot = write_rotations(tmp / "moe_rot.safetensors", moe, sink=4, block=16)
    oscar = ["--oscar", str(rot), *ARGS]
    dist = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    runs = {
        "bf16 tp1": (model, ["--attention-backend", "torch_native", *ARGS]),
        "bf16 tp2": (model, ["--attention-backend", "torch_native", "--tp", "2", *ARGS]),
        "oscar tp1": (model, oscar),
        "oscar tp2, two nodes": (model, [*oscar, *dist, "--node-rank", "0"]),
        "oscar pp2": (model, [*oscar, "--pp-size", "2"]),
        "qwen3-moe": (moe, ["--oscar", str(moe_rot), "--load-format", "dummy", *ARGS]),
    }
    with ExitStack() as stack, ThreadPoolExecutor(len(runs)) as pool:
        stack.enter_context(_follower(model, [*oscar, *dist, "--node-rank", "1"]))
        started = pool.map(lambda run: stack.enter_context(serve(run[0], run[1], device="cpu", timeout=900)),
                           runs.values())
        yield {name: s.url for name, s in zip(runs, started)}


def _prompts() -> list[list[int]]:
    """Three prompts longer than the sink plus a block, and one (8 tokens, 8 new) whose every query
    reads only the sinks and the first block: keys in full precision, as BF16 does."""
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in (45, 70, 100, 8)]


@pytest.fixture(scope="module")
def answers(servers):
    return {name: greedy_answers(url, _prompts(), NEW) for name, url in servers.items()}


def test_parallel_oscar_serves_the_tokens_of_one_process(answers):
    """The same greedy tokens, and logprobs that move by a small fraction of what 2-bit
    quantization moves them (OSCAR vs BF16 at --tp 1): tensor parallelism's float noise may flip a
    code sitting on a rounding edge (tests/test_server_smollm2.py says more), a rank with a wrong
    rotation, rows or window would move them by the quantization error or more."""
    one = answers["oscar tp1"]
    noise = logprob_gaps(answers["bf16 tp2"], answers["bf16 tp1"])
    quant = logprob_gaps(one, answers["bf16 tp1"], same_tokens=False)
    gaps = {name: logprob_gaps(answers[name], one) for name in ("oscar tp2, two nodes", "oscar pp2")}
    for name, g in {"BF16 tp2 vs tp1": noise, "OSCAR vs BF16 at tp1": quant, **gaps}.items():
        print(f"\n{name}: logprob gap mean {mean(g):.2e}, max {max(g):.2e} over {len(g)} tokens")
    assert mean(gaps["oscar tp2, two nodes"]) <= 0.1 * mean(quant)
    assert max(gaps["oscar pp2"]) == 0  # stages split the layers, no sum: the same arithmetic


def test_full_precision_windows_give_bf16_tokens(answers):
    oscar, bf16 = answers["oscar tp1"][-1], answers["bf16 tp1"][-1]
    gap = max(logprob_gaps([oscar], [bf16]))
    print(f"\nprompt inside the sink and first block: largest logprob gap to BF16 {gap:.2e}")
    assert gap < 1e-3  # the same tokens; rotated keys in float32: rounding only


def test_folded_weights_are_those_of_one_process(servers):
    one, two, plain = (weights_by_name(servers[name], "model.layers.1.self_attn.o_proj.weight", 8)
                       for name in ("oscar tp1", "oscar tp2, two nodes", "bf16 tp1"))
    assert len(two[0]) == 2 * len(one[0])  # both ranks' columns; the padded query heads' are zero
    assert [row[:len(one[0])] for row in two] == one
    assert all(v == 0 for row in two for v in row[len(one[0]):])
    assert one != plain  # folded: R_V of the one KV head applied to every query head's columns


def test_qwen3_moe_is_served_and_its_cache_reused(servers):
    ids = _prompts()[2]
    cold = stress.generate(servers["qwen3-moe"], ids, NEW)
    warm = stress.generate(servers["qwen3-moe"], ids, NEW)
    assert warm["meta_info"]["cached_tokens"] >= len(ids) // 16 * 16 - 16
    assert warm["output_ids"] == cold["output_ids"]
