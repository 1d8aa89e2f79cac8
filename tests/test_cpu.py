"""`oscar-serve --device cpu`'s environment (oscar_sglang.cpu): the CPU engine selected and, where
the CUDA-only `sgl_kernel` wheel cannot be imported (this machine), the stand-in first on
PYTHONPATH, so every process sglang starts sees both; a second pass changes nothing (the server
re-runs itself once)."""

import os

from oscar_sglang import cpu


def test_environment_selects_the_cpu_engine_and_the_standin_once():
    env = cpu.environment({"PATH": "/bin", "PYTHONPATH": "/elsewhere"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["PATH"] == "/bin"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(cpu.STANDIN), "/elsewhere"]
    assert cpu.environment(env) is None
    assert cpu.device_of(["--model-path", "m", "--device", "cpu"]) == "cpu" and cpu.device_of(["--device=cuda"]) == "cuda"
