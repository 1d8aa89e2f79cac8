"""sglang's parallel modes (``--tp``, ``--pp-size``, ``--nnodes``) on its CPU engine.

Two limitations of sglang 0.5.23's CPU engine, each worked around here and only here:

* **Thread binding** (:func:`thread_binding`): a CPU rank takes the cores of one NUMA node; with
  more ranks on a machine than NUMA nodes sglang stops at start-up and asks for
  ``SGLANG_CPU_OMP_THREADS_BIND`` (one core list per rank, ``|``-separated); it counts the ranks of
  every machine, so any multi-node launch needs it. ``oscar-serve --device cpu`` derives it from the
  cores the process may run on, split evenly over this machine's ranks (ranks share cores when
  there are more ranks than cores). A value the user set is kept. sglang applies the binding only
  through its compiled CPU kernels (AMX or arm64); elsewhere every rank would start one OpenMP
  thread per core, and ranks spinning on each other's cores slow every step many times over
  (docs/results.md), so ``OMP_NUM_THREADS`` is set to a rank's share too (unless set already).
* **PyNccl on CPU** (:data:`HOOKS`): ``parallel_state.init_model_parallel_group`` turns PyNccl on
  for every in-tree device but NPU and XPU, so on CPU each rank dies building a CUDA communicator
  ("Expected a cuda device, but got: cpu"). The hook passes ``use_pynccl=False`` on the CPU
  engine, leaving the groups on the gloo backend sglang already chose for CPU (its collectives
  then take their ``torch.distributed`` paths). It is registered only in processes running the CPU
  engine: GPU serving never sees it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

BIND_VARIABLE = "SGLANG_CPU_OMP_THREADS_BIND"
THREADS_VARIABLE = "OMP_NUM_THREADS"


def groups_without_pynccl(original, *args, **kwargs):
    """``init_model_parallel_group`` with PyNccl off (CPU engine only)."""
    kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


HOOKS = (  # (target, hook, kind) for sglang's HookRegistry, as oscar_sglang.plugin.HOOKS
    ("sglang.srt.distributed.parallel_state.init_model_parallel_group", groups_without_pynccl, "around"),
)


def ranks(argv: Sequence[str]) -> tuple[int, int]:
    """(all ranks, ranks on this machine) of one ``sglang serve`` command line: dp x tp x pp, and
    that over ``--nnodes`` (sglang's flag names and aliases; abbreviations such as ``--tp`` as its
    parser takes them)."""
    p = argparse.ArgumentParser(add_help=False)
    for name, alias in (("tp", "tensor"), ("pp", "pipeline"), ("dp", "data")):
        p.add_argument(f"--{name}-size", f"--{alias}-parallel-size", dest=name, type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    a, _ = p.parse_known_args(list(argv))
    world = a.dp * a.tp * a.pp
    return world, max(1, world // a.nnodes)


def numa_nodes(root: Path = Path("/sys/devices/system/node")) -> int:
    """NUMA nodes of this machine (1 where sysfs does not list them)."""
    return max(1, len(list(root.glob("node[0-9]*"))))


def thread_binding(cores: Sequence[int], ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` an even share of ``cores``
    (contiguous groups; with fewer cores than ranks, rank r takes core r mod len(cores))."""
    cores = sorted(cores)
    if ranks > len(cores):
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    per, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = per + (r < extra)
        groups.append(cores[start:start + n])
        start += n
    return "|".join(",".join(map(str, g)) for g in groups)


def binding_for(argv: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``env`` for ``argv``: none where the user set a binding, or where
    sglang's default (a NUMA node per rank) has a node for every rank (sglang counts the ranks of
    all machines there, so a multi-node launch gets a binding of its local ranks)."""
    world, local = ranks(argv)
    if env.get(BIND_VARIABLE) or world <= numa_nodes():
        return {}
    binding = thread_binding(sorted(os.sched_getaffinity(0)), local)
    threads = min(len(group.split(",")) for group in binding.split("|"))
    return {BIND_VARIABLE: binding, **({} if env.get(THREADS_VARIABLE) else {THREADS_VARIABLE: str(threads)})}
