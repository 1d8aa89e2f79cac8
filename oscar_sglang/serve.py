"""``oscar-serve`` (also ``python -m oscar_sglang.serve``): ``sglang serve`` that also runs
on a machine without a GPU.

    oscar-serve --model-path M --oscar ROT [--device cpu] [any other sglang serve flag]

With ``--device cpu`` it first runs itself again, once, in the environment sglang's CPU engine
needs (``oscar_sglang.cpu.environment``: the engine selected, the ``sgl_kernel`` stand-in on
PYTHONPATH where the compiled package cannot be imported, a thread binding for ``--tp``/``--pp-size``
with more ranks than NUMA nodes), so that every process sglang starts has it too
(``oscar_sglang.cpu`` says what that does and does not cover). Anything else is passed to
``sglang serve`` unchanged: on a GPU machine this is exactly ``sglang serve``.
"""

from __future__ import annotations

import os
import sys

from oscar_sglang import cpu


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if cpu.device_of(argv) == "cpu":
        # This is a program's own start-up (like `export` in a shell), before sglang is imported.
        env = cpu.environment(os.environ, argv)
        if env is not None:
            os.execve(sys.executable, [sys.executable, "-m", "oscar_sglang.serve", *argv], env)
    from sglang.cli.main import main as sglang_main

    sys.argv = ["sglang", "serve", *argv]
    sglang_main()


if __name__ == "__main__":
    main()
