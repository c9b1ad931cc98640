"""The local backend: the bundled SmolLM2-135M-Instruct served by vLLM's CPU build in its own process.

vLLM lives in a separate virtualenv (`.venv-vllm`, made by `setup.sh`), because its pins
(transformers, torch extras) differ from the gateway's. This module finds that environment,
prepares the model folder once under `DATA_DIR/models/`, and runs the OpenAI API server.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServingError

log = logging.getLogger(__name__)

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
    vllm_args: tuple[str, ...] = ()  # more flags for vLLM (the `vllm_args` setting); they win over ours

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
            *tool_calling_args(self.model_dir, self.vllm_args),
            *self.vllm_args,
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

    def wait_ready(
        self,
        process: subprocess.Popen[bytes] | None = None,
        timeout_s: float = 600.0,
        stop: threading.Event | None = None,
    ) -> None:
        """Poll `/health` until it answers 200; fail early if the process dies (or `stop` is set)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
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


TOOLS_TEMPLATE = Path(__file__).with_name("chat_templates") / "chatml_tools.jinja"
_TOOL_FLAGS = ("--tool-call-parser", "--enable-auto-tool-choice", "--chat-template")


def chat_template(model_dir: Path) -> str:
    """The model's own chat template (`chat_template.jinja`, else `tokenizer_config.json`); "" if none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    template = config.get("chat_template")
    return template if isinstance(template, str) else ""


def tool_calling_args(model_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """vLLM flags that turn on tool calling for this model, or none.

    A template that already renders `tools` with `<tool_call>` tags gets the `hermes` parser as it
    is. A ChatML template without tools (the bundled SmolLM2's) gets the same template with the
    Hermes tool section added (`chat_templates/chatml_tools.jinja`), which the `hermes` parser
    reads. Anything else is left alone: its tool format is unknown. Tool flags given in `extra`
    (`vllm_args`) replace ours.
    """
    if any(arg.split("=", 1)[0] in _TOOL_FLAGS for arg in extra):
        return []
    template = chat_template(model_dir)
    auto = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if "tools" in template and "<tool_call>" in template:
        return auto
    if "<|im_start|>" in template and "tools" not in template:
        return [*auto, "--chat-template", str(TOOLS_TEMPLATE)]
    log.info("the model's chat template has no known tool format: tool calling stays off (see vllm_args)")
    return []


class LocalStart:
    """Starts the local vLLM in a background thread, so the gateway can listen meanwhile.

    `status()` says how far it got ("starting local vLLM: 45 s"), None once vLLM answers, or why
    it failed. The thread that starts vLLM stays alive as long as vLLM does (it waits on it), so
    vLLM's death signal (PR_SET_PDEATHSIG, armed for the starting thread) fires only when the
    gateway itself dies.
    """

    def __init__(self, local: LocalVLLM, log_path: Path, on_ready: Callable[[], None], timeout_s: float = 900.0):
        self.local, self.log_path, self.on_ready, self.timeout_s = local, log_path, on_ready, timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.on_failure: Callable[[], None] | None = None  # `gateway serve`: stop the gateway
        self.phase = "starting local vLLM"
        self.ready = threading.Event()
        self._begun = time.monotonic()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="local-vllm", daemon=True)

    def begin(self) -> LocalStart:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            if not (self.local.model_dir / "config.json").exists():
                self.phase = "preparing the bundled model"
                self.local.prepare()
            with self._lock:
                if self._stopping.is_set():
                    return
                self.phase = "starting local vLLM"
                self.process = self.local.start(self.log_path)
            self.local.wait_ready(self.process, self.timeout_s, stop=self._stopping)
            if self._stopping.is_set():
                return
            log.info("local vLLM ready on %s serving %s", self.local.url, self.local.model_name)
            self.ready.set()
            self.on_ready()
            code = self.process.wait()  # keeps this thread, and so vLLM's death signal, alive
            if not self._stopping.is_set():
                self._fail(f"local vLLM exited with code {code}")
        except Exception as exc:  # any failure to start: said on /readyz and in the log, in one line
            self._fail(str(exc))

    def _fail(self, error: str) -> None:
        self.error = error
        log.error("local vLLM failed: %s (log: %s)", error, self.log_path)
        if self.on_failure is not None:
            self.on_failure()

    def status(self) -> str | None:
        """None when vLLM answers; else what is happening, with the seconds spent, or the failure."""
        if self.error is not None:
            return f"local vLLM failed: {self.error} (log: {self.log_path})"
        if self.ready.is_set():
            return None
        return f"{self.phase}: {time.monotonic() - self._begun:.0f} s"

    def stop(self) -> None:
        """Stop vLLM (or keep it from starting), wherever the start is."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None:
            stop_process(process)


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
