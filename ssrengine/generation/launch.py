"""Start and stop a local inference server for ``generation.launch = true``.

`launch_sglang` runs ``python -m sglang.launch_server --model-path ... --host 127.0.0.1
--port <free port>`` in its own process group, waits until ``GET /health`` answers 200, and
`ServerProcess.stop` ends that process group at close (and at interpreter exit, should the
caller forget). The server's output goes to a log file whose tail is shown if it dies
during startup.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from ssrengine.core.errors import InputError
from ssrengine.generation.base import BackendError
from ssrengine.models.fetch import resolve_model_path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sglang_command(
    model_path: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    tp_size: int = 1,
    dp_size: int = 1,
    mem_fraction: float = 0.85,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    python: str = "",
) -> list[str]:
    """The server command line; `python` (empty: this interpreter) runs SGLang, which may live
    in another environment, since SGLang releases pin their own torch and transformers."""
    cmd = [
        python or sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp_size),
        "--dp-size",
        str(dp_size),
        "--mem-fraction-static",
        str(mem_fraction),
        "--dtype",
        sglang_dtype(dtype),
    ]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def sglang_dtype(dtype: str) -> str:
    """SGLang's --dtype for model.dtype: a 16-bit dtype as asked; bfloat16 for float32 (the
    master-weight default), never "auto", which SGLang resolves to float16 for an fp32
    checkpoint (python/sglang/srt/configs/model_config.py, _get_and_verify_dtype), whose
    range a model trained in bf16 can overflow."""
    return dtype if dtype in ("bfloat16", "float16") else "bfloat16"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess (its own process group) that is healthy once ``__init__`` returns."""

    def __init__(
        self,
        cmd: list[str],
        url: str,
        *,
        name: str = "server",
        startup_timeout_s: float = 900.0,
        health_path: str = "/health",
        env: dict[str, str] | None = None,
    ) -> None:
        self.url, self.name, self.health_path = url, name, health_path
        fd, log_name = tempfile.mkstemp(prefix=f"ssrengine-{name}-", suffix=".log")
        self.log_path = Path(log_name)
        self._log = os.fdopen(fd, "w")
        log.info("starting %s at %s (log: %s): %s", name, url, self.log_path, " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends its children too
            env={**os.environ, **(env or {})},
        )
        atexit.register(self.stop)
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
        try:
            conn.request("GET", parts.path + self.health_path)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline, pause = time.monotonic() + timeout_s, 0.1
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise BackendError(
                    f"{self.name} exited with code {code} during startup; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}",
                    server=self.url,
                )
            if self._healthy():
                log.info("%s is ready at %s", self.name, self.url)
                return
            time.sleep(pause)
            pause = min(2.0, pause * 1.5)
        raise BackendError(
            f"{self.name} not healthy after {timeout_s:g}s; see {self.log_path}", server=self.url
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it if still there after ``timeout_s``."""
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop after SIGTERM; killing it", self.name)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_sglang(
    model: str,
    *,
    tp_size: int = 1,
    dp_size: int = 1,
    mem_fraction: float = 0.85,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    startup_timeout_s: float = 900.0,
    python: str = "",
) -> ServerProcess:
    """Start an SGLang server for ``model`` on a free local port; returns once it is healthy.
    `python`: the interpreter of the environment SGLang is installed in (empty: this one)."""
    if python:
        if not os.access(python, os.X_OK):
            raise InputError(
                f"{python!r} is not an executable Python", field="generation.launch_python"
            )
    elif importlib.util.find_spec("sglang") is None:
        raise InputError(
            "generation.launch needs SGLang in this environment (GPU only): "
            "pip install 'ssrengine[sglang]', set generation.launch_python to the Python of an "
            "environment that has it, or start a server yourself and set generation.url",
            field="generation.launch",
        )
    port = free_port()
    cmd = sglang_command(
        str(resolve_model_path(model)),
        port=port,
        tp_size=tp_size,
        dp_size=dp_size,
        mem_fraction=mem_fraction,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        python=python,
    )
    return ServerProcess(
        cmd, f"http://127.0.0.1:{port}", name="sglang", startup_timeout_s=startup_timeout_s
    )
