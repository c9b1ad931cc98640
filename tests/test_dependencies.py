"""Dependencies point one way (DESIGN.md): `evals` may use everything; `gateway` never imports
`evals` at module level (its CLI loads eval commands inside a function); `retrieval`,
`guardrails` and `serving` import neither `gateway` nor `evals`."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "gateway": ("evals",),
    "retrieval": ("gateway", "evals"),
    "guardrails": ("gateway", "evals"),
    "serving": ("gateway", "evals"),
}


def _modules(package: str) -> list[str]:
    """Every importable module of the package (scripts such as Alembic's migrations are not modules)."""
    found = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=package + "."):
        if not any(part == "migrations" for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package: str) -> None:
    modules = _modules(package)
    assert len(modules) > 3, modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = [m for m in loaded for f in FORBIDDEN[package] if m == f or m.startswith(f + ".")]
    assert not wrong, f"importing {package} loads {wrong}"


# Where a package may touch the environment: settings.py builds Settings from GATEWAY_*, and the
# local vLLM child inherits the parent's environment. Anything else reads settings passed in.
# evals/nightly.py only writes HF_HUB_DISABLE_PROGRESS_BARS (--no-progress), read by Hugging Face libraries.
# retrieval/onnx_encoder.py reads XDG_CACHE_HOME, the platform's cache location (not a setting), for the
# ONNX export cache of callers that give none (the gateway gives DATA_DIR/onnx).
ENVIRON_ALLOWED = {"gateway/settings.py", "serving/local.py", "evals/nightly.py", "retrieval/onnx_encoder.py"}


def test_no_module_reads_the_environment_for_a_setting() -> None:
    readers = sorted(
        str(path.relative_to(ROOT))
        for package in (*FORBIDDEN, "evals")
        for path in (ROOT / package).rglob("*.py")
        if any(word in path.read_text(encoding="utf-8") for word in ("os.environ", "getenv("))
    )
    assert set(readers) <= ENVIRON_ALLOWED, readers


def test_the_cli_uses_no_argparse_internals() -> None:
    for package in (*FORBIDDEN, "evals"):
        for path in (ROOT / package).rglob("*.py"):
            assert "_option_string_actions" not in path.read_text(encoding="utf-8"), path
