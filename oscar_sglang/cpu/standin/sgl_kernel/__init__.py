"""Stand-in for sglang's compiled ``sgl_kernel`` package on machines without a GPU.

The PyPI ``sgl_kernel`` wheel is built for CUDA only: without libcuda it fails to import.
sglang's CPU engine imports a few of its names at import time but, on CPUs without AMX, runs
the torch ``forward_native`` paths and never calls them. Every attribute here is a function
that raises if it is ever called, so nothing can silently depend on it computing anything.
``oscar-serve --device cpu`` puts this directory first on the import path only when the real
package cannot be imported (``oscar_sglang.cpu``).
"""


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this machine has only oscar_sglang's CPU stand-in for "
            "sgl_kernel (its compiled CPU ops are missing): this sglang code path needs them.")

    fn.__name__ = name
    return fn


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
