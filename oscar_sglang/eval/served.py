"""The served path: the same token ids through a real sglang server (HTTP only; no sglang import).

:func:`server_args` gives the flags that make serving comparable to the simulation: prefill in
chunks of ``chunk`` tokens (each chunk reads earlier ones from the cache), no radix cache (a cached
prefix would move the chunk boundaries), the overlap scheduler off, bounded memory. BF16 is
``--attention-backend torch_native``; OSCAR is ``--oscar ROT``.

- :func:`input_nll`: per-position NLL of ``tokens[1:]`` from input-token logprobs
  (``return_logprob``, ``logprob_start_len=0``), aligned with ``metrics.lm_scores``.
- :func:`greedy`: ``max_new_tokens`` greedy tokens after ``prompt`` from ``/generate`` (needles).
- :func:`top1`: the top-1 input token at each answer position (``top_logprobs_num=1``; recall).

The server itself is started by :func:`oscar_sglang.launch.serve` (``oscar-serve``, which also sets up
sglang's CPU engine for ``--device cpu``).
"""

from __future__ import annotations

from pathlib import Path

TIMEOUT = 3600


def server_args(chunk: int, max_tokens: int, rotations: Path | None) -> list[str]:
    """launch_server flags for BF16 (``rotations=None``) or OSCAR."""
    backend = ["--oscar", str(rotations)] if rotations else ["--attention-backend", "torch_native"]
    return [*backend, "--chunked-prefill-size", str(chunk), "--max-total-tokens", str(max_tokens),
            "--context-length", str(max_tokens), "--disable-radix-cache", "--disable-overlap-schedule",
            "--random-seed", "0"]


def _generate(url: str, payload: dict) -> dict:
    import requests

    r = requests.post(f"{url}/generate", json=payload, timeout=TIMEOUT)
    r.raise_for_status()
    return r.json()


def input_nll(url: str, tokens: list[int]) -> list[float]:
    """NLL of tokens[1:] given their prefixes, as the server computes it (float list of len T-1)."""
    out = _generate(url, {"input_ids": tokens, "return_logprob": True, "logprob_start_len": 0,
                          "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
    if lps[0] is None:  # the first token has no prediction
        lps = lps[1:]
    if len(lps) != len(tokens) - 1:
        raise RuntimeError(f"server returned {len(lps)} input logprobs for {len(tokens)} tokens")
    return [-lp for lp in lps]


def top1(url: str, prompt: list[int], answer: list[int]) -> list[int]:
    """The server's top-1 token at each ``answer`` position of the prefilled ``prompt + answer``."""
    out = _generate(url, {"input_ids": prompt + answer, "return_logprob": True, "top_logprobs_num": 1,
                          "logprob_start_len": len(prompt) - 1,
                          "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    rows = out["meta_info"]["input_top_logprobs"][-len(answer):]
    if len(rows) != len(answer) or any(not r for r in rows):
        raise RuntimeError(f"server returned no top-1 for some of the {len(answer)} answer positions")
    return [r[0][1] for r in rows]


def greedy(url: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation token ids (stops early only at EOS)."""
    out = _generate(url, {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                     "temperature": 0, "ignore_eos": True}})
    return list(out["output_ids"])
