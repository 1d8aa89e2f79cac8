"""Shared-prefix RAG at one KV memory budget on CPU: BF16 (torch_native) vs --oscar.

A small configuration of benchmarks/rag_prefix.py's workload driver (dummy-weight 4-layer
model with SmolLM2's tokenizer and head_dim 64; 5 documents of 1024 tokens; 6 questions
per document on average, Zipf-ordered; 2 streaming clients, 1 running request; prefill
only; the default position rule, sink 64 and blocks of 1024). The 4 MiB budget holds 2
documents in BF16 and all 5 as 2-bit rows with their sinks and tails, so:
- each server sizes exactly the capacity derived from the budget (OSCAR >= 6x BF16);
- OSCAR's prefix-cache hit rate is near the ideal one (every question after its document's first
  hits the whole document), over twice BF16's, and it computes fewer prefill tokens;
- the frontend-language example (examples/rag_questions.py: fork over the questions of a
  document, run_batch over documents) runs against the OSCAR server right after, on its cache:
  every fork but the first of a document reads the document from the 2-bit cache, the second up to
  the start of the block its question diverges in (the rule's bounded recompute), the later ones all
  of it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from oscar_sglang.kernels.rule import PositionRule



def test_rag_prefix_hit_rate_and_frontend_program(tmp_path):
    from benchmarks import rag_prefix
    import rag_questions

    args = rag_prefix.parse_args([
        "--device", "cpu", "--model", "tiny", "--docs", "5", "--doc-tokens", "1024", "--questions", "6",
        "--concurrency", "2", "--max-running", "1", "--kv-budget-mb", "4", "--max-new-tokens", "1",
        "--out-dir", str(tmp_path)])
    model, extra = rag_prefix.prepare_model(args.model, tmp_path)
    rot = rag_prefix.make_rotations(model, real_weights=False, out=tmp_path / "rot.safetensors")
    workloads = rag_prefix.build_workloads(args)
    bf16_cfg, oscar_cfg = rag_prefix.build_configs(args, model, rot, extra)
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:  # start both servers at once (startup dominates)
        starting = [pool.submit(stack.enter_context, rag_prefix.start_server(cfg, args, model, tmp_path))
                    for cfg in (bf16_cfg, oscar_cfg)]
        bf16_srv, oscar_srv = (f.result() for f in starting)
        [bf16] = rag_prefix.drive_server(bf16_cfg, args, bf16_srv, workloads)
        [oscar] = rag_prefix.drive_server(oscar_cfg, args, oscar_srv, workloads)
        docs = rag_questions.shakespeare_documents(2, 1500)
        answers, metas = rag_questions.run(oscar_srv.url, docs, questions_per_doc=2, concurrency=2, max_tokens=2)
    rag_prefix.write_results([bf16, oscar], args)
    summary = {k: (bf16[k], oscar[k]) for k in ("capacity_tokens", "hit_rate", "prefill_tokens_computed",
                                                 "requests_per_s", "ttft_p50_ms", "itl_p50_ms")}
    print(f"\nRAG (BF16, OSCAR) at {args.kv_budget_mb} MiB: {summary}; frontend hit rate {rag_questions.hit_rate(metas):.3f}")

    # capacity: what the budget split asked for is what sglang sized (whole pages)
    assert bf16["capacity_tokens"] == bf16_cfg.max_total_tokens
    assert oscar["capacity_tokens"] == oscar_cfg.max_total_tokens // oscar["page_size"] * oscar["page_size"]
    assert oscar["capacity_tokens"] >= 6 * bf16["capacity_tokens"]
    # same requests, same prompts; the hit-rate / prefill effect
    assert bf16["prompt_tokens"] == oscar["prompt_tokens"] > 5 * 6 * 1024
    assert oscar["hit_rate"] >= 0.9 * oscar["ideal_hit_rate"] and oscar["hit_rate"] >= 2 * bf16["hit_rate"]
    assert bf16["prefill_tokens_computed"] > oscar["prefill_tokens_computed"]
    assert (tmp_path / "rag_prefix_cpu.csv").exists() and (tmp_path / "rag_prefix_cpu.png").stat().st_size > 0

    # the frontend program: every question answered, on top of the cached document prefixes
    assert sum(map(len, answers)) == 2 * 2 and all(isinstance(a, str) for ans in answers for a in ans)
    rule = PositionRule()  # the rotations file's
    for ans, meta in zip(answers, metas):
        assert len(meta) == len(ans)
        cached, prompt = sorted(m["cached_tokens"] for m in meta), min(m["prompt_tokens"] for m in meta)
        # the forks share the document and diverge at their question (< 64 tokens), inside a block: the
        # first fork computes the document, the next reads it from the cache up to that block's start and
        # keeps the block's rows, so the ones after it read the whole document
        assert all(c >= rule.rebuild_start(prompt - 64) > 0 for c in cached[1:]), cached
        assert len(cached) < 3 or cached[-1] >= 0.8 * prompt, cached
