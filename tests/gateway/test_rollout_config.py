"""The reloadable config: deployment parsing and its messages, versions, and aliases (issue 18):
`--alias` adds to the embedded default, and aliases change with a reload, without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import with_default_alias
from gateway.rollout import ConfigSnapshot, snapshot_of
from gateway.settings import Settings, SettingsError, load_settings
from serving.fake import FakeBackendThread
from tests.helpers import GatewayServer, create_key, prepare_database

ISSUE_SHAPE = """
[[deployments]]
name = "blue"
model = "chat"                       # the name clients ask for
backend = "http://10.0.0.5:8000"     # or backends = [...]
backend_model = "smollm2-135m-instruct"
weight = 90

[[deployments]]
name = "green"
model = "chat"
backend = "http://10.0.0.6:8000"
backend_model = "smollm2-135m-instruct"
weight = 10

[[deployments]]
name = "candidate"
model = "chat"
backend = "http://10.0.0.7:8000"
backend_model = "smollm2-360m-instruct"
shadow = 0.25                        # share of requests copied to it; its answer is never returned
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings({"config": path}, environ={})


def test_the_issue_shape_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, ISSUE_SHAPE)
    blue, green, candidate = settings.deployments
    assert (blue.name, blue.model, blue.backends, blue.backend_model, blue.weight) == (
        "blue",
        "chat",
        ("http://10.0.0.5:8000",),
        "smollm2-135m-instruct",
        90.0,
    )
    assert green.weight == 10 and candidate.shadow == 0.25 and candidate.weight == 0
    assert candidate.backend_model == "smollm2-360m-instruct"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("weight = 90", "weight = -1"), "deployment 'blue': 'weight' must not be negative"),
        (("weight = 90", 'weight = "heavy"'), "deployment 'blue': 'weight' must be a number"),
        (
            ("shadow = 0.25", "shadow = 2"),
            "deployment 'candidate': 'shadow' is the share of requests copied to it, 0-1",
        ),
        (('name = "green"', 'name = "blue"'), "deployment name 'blue' is used twice"),
        (('backend = "http://10.0.0.6:8000"', 'backend = "10.0.0.6:8000"'), "must start with http:// or https://"),
        (('backend_model = "smollm2-360m-instruct"', 'colour = "red"'), "unknown key(s) 'colour'"),
        (("weight = 10\n", "weight = 10\nbackends = ['http://a:1']\n"), "give exactly one of 'backend'"),
    ],
)
def test_a_wrong_deployment_is_named_with_its_file(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load(tmp_path, ISSUE_SHAPE.replace(*change, 1))
    assert message in str(error.value) and "gateway.toml" in str(error.value)


def test_a_model_served_only_by_a_shadow_is_refused(tmp_path: Path) -> None:
    text = ISSUE_SHAPE + '\n[[deployments]]\nname = "lonely"\nmodel = "other"\nbackend = "http://h:1"\nshadow = 1\n'
    with pytest.raises(SettingsError, match="'other' have only shadow deployments"):
        load(tmp_path, text)


def test_the_version_follows_the_content_only(tmp_path: Path) -> None:
    first = snapshot_of(load(tmp_path, ISSUE_SHAPE))
    again = snapshot_of(load(tmp_path, ISSUE_SHAPE + "\n# a comment changes nothing\n"))
    heavier = snapshot_of(load(tmp_path, ISSUE_SHAPE.replace("weight = 90", "weight = 80")))
    assert first.version == again.version != heavier.version
    assert ConfigSnapshot.from_json(first.to_json()).version == first.version
    assert first.policy_version == "default"


def test_alias_flags_add_to_the_embedded_default() -> None:
    settings = Settings(alias=("handbook-bot=handbook:smollm2-135m-instruct",))
    aliases = with_default_alias(settings, "smollm2-135m-instruct").aliases
    assert aliases == {
        "smollm2-135m-instruct-rag": ("sample", "smollm2-135m-instruct"),
        "handbook-bot": ("handbook", "smollm2-135m-instruct"),
    }
    # One of the same name replaces the default; without the sample corpus there is no default.
    same = Settings(alias=("smollm2-135m-instruct-rag=docs:smollm2-135m-instruct",))
    assert with_default_alias(same, "smollm2-135m-instruct").aliases["smollm2-135m-instruct-rag"][0] == "docs"
    assert with_default_alias(Settings(sample_corpus=False), "m").aliases == {}


@pytest.fixture
def aliased(tmp_path: Path, fake_backend: FakeBackendThread) -> Iterator[tuple[GatewayServer, Path, str]]:
    path = tmp_path / "gateway.toml"
    path.write_text(f'backend = ["{fake_backend.url}"]\nalias = ["first-bot=handbook:fake-model"]\n', encoding="utf-8")
    settings = load_settings(
        {"config": path, "data_dir": tmp_path, "embedding_model": "hashing", "sample_corpus": False,
         "alias": ["pinned-bot=sample:fake-model"]}  # a flag: kept across reloads
    )  # fmt: skip
    prepare_database(settings)
    _, admin = create_key(settings, "admin")
    with GatewayServer(settings) as gateway:
        yield gateway, path, admin


def model_ids(gateway: GatewayServer, key: str) -> set[str]:
    answer = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    return {m["id"] for m in answer.json()["data"]}


def test_aliases_change_with_a_reload_without_a_restart(aliased: tuple[GatewayServer, Path, str]) -> None:
    gateway, path, admin = aliased
    assert {"first-bot", "pinned-bot"} <= model_ids(gateway, admin)
    path.write_text(path.read_text().replace("first-bot=handbook", "second-bot=faq"), encoding="utf-8")
    reply = httpx.post(gateway.url + "/admin/reload", headers={"authorization": f"Bearer {admin}"})
    assert reply.status_code == 200 and reply.json()["changed"] is True
    ids = model_ids(gateway, admin)
    assert "second-bot" in ids and "pinned-bot" in ids and "first-bot" not in ids
    # The new alias is used at once: RAG on its collection (absent here, so the gateway says which).
    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {admin}"},
        json={"model": "second-bot", "messages": [{"role": "user", "content": "hello"}]},
    )
    assert answer.status_code == 400 and "'faq'" in answer.json()["error"]["message"]
