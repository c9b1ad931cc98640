"""The local backend: the bundled SmolLM2-135M-Instruct served by vLLM's CPU build in its own process.

vLLM lives in a separate virtualenv (`.venv-vllm`, made by `setup.sh`), because its pins
(transformers, torch extras) differ from the gateway's. This module finds that environment,
prepares the model folder once under `DATA_DIR/models/`, and runs the OpenAI API server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServingError

LOCAL_MODEL_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalBackendError(ServingError):
    """The local vLLM could not be prepared or started."""


def find_vllm_python(explicit: str | None = None) -> Path:
    """The Python of the vLLM environment: explicit setting, else `.venv-vllm` at the repo root or cwd."""
    candidates = (
        [Path(explicit)] if explicit else [REPO_ROOT / ".venv-vllm/bin/python", Path.cwd() / ".venv-vllm/bin/python"]
    )
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise LocalBackendError(
        "no vLLM environment found (looked for "
        + ", ".join(str(c) for c in candidates)
        + "); run ./setup.sh, or set GATEWAY_VLLM_PYTHON, or pass --backend URL to use a running vLLM"
    )


@dataclass
class LocalVLLM:
    """Prepare and run the bundled model on the CPU build of vLLM."""

    data_dir: Path
    port: int = 8100
    host: str = "127.0.0.1"
    vllm_python: str | None = None
    kv_cache_gib: int = 2
    max_model_len: int = 4096
    model_name: str = LOCAL_MODEL_NAME

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models" / self.model_name

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> Path:
        """Dequantise the shipped GGUF into a Hugging Face folder, once."""
        if (self.model_dir / "config.json").exists():
            return self.model_dir
        python = find_vllm_python(self.vllm_python)
        print(f"preparing the bundled model in {self.model_dir} (about 30-60 s, once)", file=sys.stderr, flush=True)
        self.model_dir.parent.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).with_name("prepare_model.py")
        done = subprocess.run([str(python), str(script), str(self.model_dir)], check=False)
        if done.returncode != 0 or not (self.model_dir / "config.json").exists():
            raise LocalBackendError(f"preparing the bundled model failed (exit {done.returncode})")
        return self.model_dir

    def command(self) -> list[str]:
        return [
            str(find_vllm_python(self.vllm_python)),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--dtype", "bfloat16",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        return env

    def start(self, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        """Start vLLM in the background, in its own process group so it can be stopped as a whole.

        On Linux the child also gets SIGTERM when the thread that started it dies, even by SIGKILL
        (PR_SET_PDEATHSIG), so a gateway that is killed outright leaves no vLLM behind. Call it
        from the thread that lives as long as the server (the main thread, in `gateway serve`).
        """
        self.prepare()
        output = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            return subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        finally:
            if log_path is not None:
                output.close()  # type: ignore[union-attr]  # the child keeps its own copy of the descriptor

    def wait_ready(self, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 600.0) -> None:
        """Poll `/health` until it answers 200; fail early if the process dies."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise LocalBackendError(f"vLLM exited with code {process.returncode} while starting")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise LocalBackendError(f"vLLM did not become healthy at {self.url} within {timeout_s:.0f} s")

    def run_foreground(self) -> int:
        """`gateway backend local`: run vLLM attached to this terminal until it exits."""
        self.prepare()
        print(f"starting vLLM (CPU) with {self.model_name} on {self.url}; first start takes 1-3 min", flush=True)
        os.execve(self.command()[0], self.command(), self.environment())


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when its parent dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return set_death_signal


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Stop a process group started by `LocalVLLM.start`: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        pass
