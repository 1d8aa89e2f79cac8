"""Summaries of the evaluation results: Markdown table, CSV rows and a PNG.

Every difference is PAIRED against BF16 of the same path (simulation vs simulation, served vs
served) on the same inputs: ΔNLL and KL per 256-token window (mean ± standard error over windows),
needle / recall per probe (recall = share of the passage's tokens copied, tasks.py). ``PPL@n`` =
exp(mean NLL of the first n-1 predictions of each sequence), which is exactly the perplexity of
n-token sequences (the model is causal and the chunk boundaries depend only on the position). Agreement: served PPL / simulated PPL - 1 for the same method.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .metrics import paired, windowed


def _ppl(nll: list[list[float]], n: int) -> float:
    vals = [x for row in nll for x in row[: n - 1]]
    return math.exp(sum(vals) / len(vals))


def _window_diffs(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return [w for ra, rb in zip(a, b) for w in windowed([x - y for x, y in zip(ra, rb)])]


def summarize(part: dict[str, Any], ref: dict[str, Any], contexts: list[int], needle_len: list[int],
              recall_len: list[int]) -> dict[str, Any]:
    """One table row: PPLs, paired ΔNLL, KL, top-1, needle and recall (with paired differences)."""
    row: dict[str, Any] = {f"ppl@{n}": _ppl(part["nll"], n) for n in contexts}
    row["dnll"] = paired(_window_diffs(part["nll"], ref["nll"]))
    if "kl" in part:
        row["kl"] = paired([w for r in part["kl"] for w in windowed(r)])
        row["top1"] = sum(x for r in part["top1"] for x in r) / sum(len(r) for r in part["top1"])
    needle = [float(m == n) for m, n in zip(part["needle"], needle_len)]
    needle_ref = [float(m == n) for m, n in zip(ref["needle"], needle_len)]
    row["needle"] = sum(needle) / max(len(needle), 1)
    row["dneedle"] = paired([a - b for a, b in zip(needle, needle_ref)])
    recall = [m / n for m, n in zip(part["recall"], recall_len)]
    recall_ref = [m / n for m, n in zip(ref["recall"], recall_len)]
    row["recall"] = sum(recall) / max(len(recall), 1)
    row["drecall"] = paired([a - b for a, b in zip(recall, recall_ref)])
    return row


def rule_pairs(sim: dict[str, dict], rules: list[str], needle_len: list[int], recall_len: list[int]) -> str:
    """Markdown: every ``METHOD@RULE`` paired against ``METHOD@<rules[0]>`` on the same inputs
    (ΔNLL and ΔKL per 256-token window, needle / recall per probe)."""
    lines = [f"Paired against the same method under {rules[0]}:", "",
             "| method | ΔNLL (nats) | ΔKL (nats) | Δneedle (pts) | Δrecall (pts) |", "|---|---|---|---|---|"]
    for name, part in sim.items():
        base, _, rule = name.rpartition("@")
        ref = sim.get(f"{base}@{rules[0]}")
        if not base or rule == rules[0] or ref is None:
            continue
        needle = [float(m == n) - float(r == n) for m, r, n in zip(part["needle"], ref["needle"], needle_len)]
        recall = [(m - r) / n for m, r, n in zip(part["recall"], ref["recall"], recall_len)]
        cells = [name, _pm(paired(_window_diffs(part["nll"], ref["nll"])), digits=4),
                 _pm(paired(_window_diffs(part["kl"], ref["kl"])), digits=4), _pm(paired(needle), 100, 1),
                 _pm(paired(recall), 100, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(v: tuple[float, float], scale: float = 1.0, digits: int = 3, sign: bool = True) -> str:
    mean, se = v
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return fmt.format(mean * scale) + ("" if math.isnan(se) else f" ± {se * scale:.{digits}f}")


def markdown(rows: dict[str, dict[str, dict]], contexts: list[int], agreement: dict[str, float],
             bits: dict[str, tuple[float, float]]) -> str:
    """``rows[path][method]`` -> one Markdown table (simulation rows, then served rows);
    ``bits[method]`` = (physical bits per element at this head_dim, at head_dim 128)."""
    ppl_cols = [f"PPL@{n // 1024}K" if n % 1024 == 0 else f"PPL@{n}" for n in contexts]
    head = ["path", "method", "bits (D=128)", *ppl_cols, "ΔNLL vs BF16 (nats)", "KL (nats)", "top-1", "needle",
            "Δneedle (pts)", "recall (copied)", "Δrecall (pts)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path, methods in rows.items():
        for name, r in methods.items():
            cells = [path, name, "{:.3g} ({:.3g})".format(*bits[name]), *(f"{r[f'ppl@{n}']:.3f}" for n in contexts), _pm(r["dnll"], digits=4),
                     _pm(r["kl"], digits=4, sign=False) if "kl" in r else "-",
                     f"{r['top1']:.3f}" if "top1" in r else "-", f"{100 * r['needle']:.0f}%",
                     _pm(r["dneedle"], 100, 1), f"{100 * r['recall']:.0f}%", _pm(r["drecall"], 100, 1)]
            lines.append("| " + " | ".join(cells) + " |")
    if agreement:
        lines.append("")
        lines.append("Served vs simulation (same method, same tokens): " + "; ".join(
            f"{m}: PPL@{contexts[-1]} served/sim - 1 = {100 * d:+.2f}%" for m, d in agreement.items()))
    return "\n".join(lines)


def write_csv(path: Path, rows: dict[str, dict[str, dict]], contexts: list[int], extra: dict[str, Any],
              bits: dict[str, tuple[float, float]]) -> None:
    """Append one CSV row per (path, method); ``extra`` (commit, machine, ...) repeats on each."""
    fields = ["path", "method", "bits", "bits_d128", *(f"ppl@{n}" for n in contexts), "dnll", "dnll_se", "kl", "kl_se", "top1",
              "needle", "dneedle", "dneedle_se", "recall", "drecall", "drecall_se", *extra]
    new = not path.exists() or path.read_text().splitlines()[:1] != [",".join(fields)]
    with path.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for p, methods in rows.items():
            for name, r in methods.items():
                d = {"path": p, "method": name, "bits": f"{bits[name][0]:.4g}", "bits_d128": f"{bits[name][1]:.4g}",
                     **{f"ppl@{n}": f"{r[f'ppl@{n}']:.5f}" for n in contexts}, **extra}
                for k in ("dnll", "kl", "dneedle", "drecall"):
                    if k in r:
                        d[k], d[f"{k}_se"] = f"{r[k][0]:.6f}", f"{r[k][1]:.6f}"
                for k in ("top1", "needle", "recall"):
                    if k in r:
                        d[k] = f"{r[k]:.5f}"
                w.writerow(d)


def plot(path: Path, rows: dict[str, dict[str, dict]], contexts: list[int], title: str) -> None:
    """Left: ΔNLL vs BF16 (± s.e.) and needle / recall per method; right: PPL vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 5))
    for path_name, methods in rows.items():
        names = [f"{n} ({path_name})" for n in methods]
        vals = [r["dnll"] for r in methods.values()]
        ax[0].barh(names, [v[0] for v in vals], xerr=[0 if math.isnan(v[1]) else v[1] for v in vals])
        ax[1].barh([f"{n} needle" for n in names], [100 * r["needle"] for r in methods.values()])
        ax[1].barh([f"{n} recall" for n in names], [100 * r["recall"] for r in methods.values()])
        for name, r in methods.items():
            ax[2].plot(contexts, [r[f"ppl@{n}"] for n in contexts], marker="o",
                       ls="-" if path_name == "sim" else "--", label=f"{name} ({path_name})")
    ax[0].set(xscale="symlog", xlabel="ΔNLL vs BF16 (nats/token, paired)", title="quality cost vs method")
    ax[1].set(xlabel="% (needle: exact code; recall: tokens reproduced)", title="retrieval")
    ax[2].set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
              title="PPL vs context length")
    ax[2].set_xticks(contexts, [str(n) for n in contexts])
    ax[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto_plot(path: Path, rows: dict[str, dict], bits: dict[str, tuple[float, float]], top: int, title: str) -> None:
    """Quality vs physical bits per element (head_dim 128 equivalents) of the simulated methods:
    ΔNLL, KL, needles and copy accuracy; BF16 (16 bits) is the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if bits[n][1] < 16]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.5))
    panels = [("dnll", "ΔNLL vs BF16 (nats)", 1.0), ("kl", "KL to BF16 (nats)", 1.0),
              ("needle", "needles (%)", 100.0), ("recall", "copy accuracy (%)", 100.0)]
    for a, (key, label, scale) in zip(ax, panels):
        for n in names:
            v = rows[n][key]
            y, err = (v[0], v[1]) if isinstance(v, tuple) else (v, 0.0)
            a.errorbar(bits[n][1], y * scale, yerr=0 if math.isnan(err) else err * scale, marker="o", capsize=3)
            a.annotate(n, (bits[n][1], y * scale), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key in ("needle", "recall") and "bf16" in rows:
            a.axhline(rows["bf16"][key] * scale, ls="--", color="gray", label="BF16")
            a.legend(fontsize=7)
        a.set(xlabel="physical bits per element (head_dim 128 equivalent)", ylabel=label)
    fig.suptitle(f"{title} (ΔNLL/KL at {top} tokens)"[:300], fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
