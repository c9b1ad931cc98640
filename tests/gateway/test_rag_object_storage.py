"""A gateway whose collections live in object storage (moto in server mode, started by the tests):
it starts from the versions the database names live, publishes the sample corpus to the bucket,
and answers from a version that a batch `gateway ingest` published while it ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

pytest.importorskip("boto3")

from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import serving
from tests.retrieval.s3server import s3_endpoint_fixture, s3_root_fixture  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")


def batch_ingest(folder: Path, data_dir: Path, database: str, root: str, endpoint: str) -> None:
    """`gateway ingest` as a batch job: its own empty data dir, the shared database and bucket."""
    env = {**os.environ, "GATEWAY_S3_ENDPOINT_URL": endpoint}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest", str(folder), "--collection", "products",
         "--embedding-model", "hashing", "--no-progress", "--index-storage", root,
         "--data-dir", str(data_dir), "--database", database],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def cited(client: openai.OpenAI, question: str) -> list[str]:
    reply = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": question}],
        extra_body={"rag": {"collection": "products", "top_k": 1, "min_score": 0.05}},
    )
    return [c["document"] for c in reply.model_extra["gateway"]["citations"]]


def test_a_gateway_on_object_storage_follows_a_batch_ingest(
    tmp_path: Path, fake_backend: FakeBackendThread, s3_root: str, s3_endpoint: str
) -> None:
    gateway_dir = tmp_path / "gateway"
    gateway_dir.mkdir()
    settings = make_settings(
        gateway_dir, fake_backend.url, sample_corpus=True, index_storage=s3_root, s3_endpoint_url=s3_endpoint
    )
    database = f"sqlite:///{gateway_dir / 'gateway.db'}"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zorblat.txt").write_text("The Zorblat 3000 vacuum cleaner weighs 4.2 kg and costs 199 euros.")
    batch_ingest(docs, tmp_path / "job-1", database, s3_root, s3_endpoint)
    with serving(settings) as (gw, client):
        assert cited(client, "How much does the Zorblat 3000 weigh?") == ["zorblat.txt"]  # fetched at start-up
        assert (gateway_dir / "indexes" / "sample" / "CURRENT").is_file()
        remote = gw.services.store.sync.remote  # type: ignore[union-attr]
        listed = remote.client.list_objects_v2(Bucket=remote.bucket, Prefix=remote.prefix + "sample/")
        assert any(o["Key"].endswith("/COMPLETE.json") for o in listed["Contents"])  # published, not only local

        (docs / "quibble.md").write_text("# Quibble phone\n\nThe Quibble phone battery lasts 31 hours of talk time.")
        batch_ingest(docs, tmp_path / "job-2", database, s3_root, s3_endpoint)
        deadline = time.monotonic() + 10  # the default poll is every 5 s
        while cited(client, "Quibble phone battery talk time?") != ["quibble.md"]:
            assert time.monotonic() < deadline, "the new version was not served within 10 s"
            time.sleep(0.2)
