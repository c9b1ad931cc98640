"""The local vLLM's command: tool calling from the model's chat template, and `vllm_args`."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.settings import load_settings
from serving.local import TOOLS_TEMPLATE, LocalVLLM, tool_calling_args

CHATML = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'}}{% endfor %}"


def _model(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def test_a_chatml_template_without_tools_gets_the_hermes_template(tmp_path: Path) -> None:
    args = tool_calling_args(_model(tmp_path, CHATML))
    assert args == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template", str(TOOLS_TEMPLATE)]
    assert TOOLS_TEMPLATE.exists()


def test_a_template_with_hermes_tools_is_used_as_it_is(tmp_path: Path) -> None:
    template = "{% if tools %}<tools>{{ tools }}</tools> <tool_call>{% endif %}" + CHATML
    expected = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert tool_calling_args(_model(tmp_path, template)) == expected


def test_an_unknown_template_leaves_tool_calling_off(tmp_path: Path) -> None:
    assert tool_calling_args(_model(tmp_path, "[INST] {{ messages }} [/INST]")) == []


def test_vllm_args_are_appended_and_replace_our_tool_flags(tmp_path: Path) -> None:
    _model(tmp_path, CHATML)
    local = LocalVLLM(tmp_path, vllm_args=("--tool-call-parser", "pythonic", "--enable-auto-tool-choice"))
    command = local.command()
    assert command[-3:] == ["--tool-call-parser", "pythonic", "--enable-auto-tool-choice"]
    assert "hermes" not in command and "--chat-template" not in command
    plain = LocalVLLM(tmp_path, vllm_args=("--max-num-seqs", "8")).command()
    assert plain[-2:] == ["--max-num-seqs", "8"] and "hermes" in plain


def test_the_vllm_args_setting_keeps_flag_values() -> None:
    settings = load_settings(environ={"GATEWAY_VLLM_ARGS": "--max-num-seqs 64 --enforce-eager"})
    assert settings.vllm_args == ("--max-num-seqs", "64", "--enforce-eager")
