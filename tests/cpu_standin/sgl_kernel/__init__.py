"""TEST DOUBLE for sglang's compiled `sgl_kernel` package on machines without a GPU.

The installed sgl_kernel wheel only ships CUDA builds (it fails to import without
libcuda). sglang's CPU engine imports a few of its names at import time but, on
CPUs without AMX, runs the `forward_native` torch paths and never calls them.
Every attribute here is a function that raises if it is ever called, so a test
can never silently depend on this stand-in computing anything.
"""


def _missing(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a CPU test stand-in and must not be called")

    fn.__name__ = name
    return fn


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
