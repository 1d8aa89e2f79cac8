"""Start an sglang server in a subprocess and wait until it answers.

Used by the demo, the evaluation, the benchmarks and the tests that talk to a real server.
``entry`` picks the command line: ``oscar-serve`` (the default: ``sglang serve`` that also
sets up sglang's CPU engine for ``--device cpu``, see ``oscar_sglang.serve``), ``sglang serve``
or ``python -m sglang.launch_server``. The environment of the child is the caller's
(``env=None``) or exactly ``env``. CPU servers get ``--sleep-on-idle``: several started here share
two cores, and an idle sglang scheduler otherwise keeps one busy.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class LaunchError(RuntimeError):
    """The server exited or did not become ready; carries the tail of its log (and its path)."""

    def __init__(self, message: str, log: Path):
        super().__init__(message)
        self.log = log


ENTRIES = {  # entry name -> the command line that starts a server
    "oscar-serve": [sys.executable, "-m", "oscar_sglang.serve"],
    "sglang serve": [str(Path(sys.executable).with_name("sglang")), "serve"],  # sglang's console script
    "launch_server": [sys.executable, "-m", "sglang.launch_server"],
}


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    import requests

    try:
        # /ready is 200 once sglang's own warm-up request has finished (/v1/models answers before it
        # is sent): a caller that reads the KV pool or compares outputs sees no warm-up in flight
        return requests.get(f"{url}/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(model: str | Path, args: Sequence[str] = (), *, port: int | None = None, device: str | None = None,
          env: Mapping[str, str] | None = None, timeout: float = 600, log: Path | None = None,
          entry: str = "oscar-serve") -> Iterator[Server]:
    """Run ``ENTRY --model-path MODEL [--device DEVICE] --port PORT ARGS...`` until the block exits.

    Raises LaunchError (with the log tail) if it exits early or is not ready within ``timeout`` s.
    On exit the server gets SIGTERM, then SIGKILL after 30 s.
    """
    port = port or free_port()
    cmd = [*ENTRIES[entry], "--model-path", str(model), "--port", str(port), *args]
    if device:
        cmd += ["--device", device]
    if device == "cpu":  # an idle scheduler polls its sockets instead of spinning a core the others need
        cmd.append("--sleep-on-idle")
    log = log or Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=None if env is None else dict(env))
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise LaunchError(f"server exited with {proc.returncode}:\n{_tail(log)}", log)
            if time.monotonic() > deadline:
                raise LaunchError(f"server not ready after {timeout:.0f} s:\n{_tail(log)}", log)
            time.sleep(1)
        yield Server(url=url, process=proc, log=log)
    finally:
        _stop(proc, grace=30)
