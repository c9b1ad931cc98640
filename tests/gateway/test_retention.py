"""`gateway db prune`: old records (and their labels) go, in batches, archived first; the rest stays."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from gateway.db import audit_records, create_engine, review_labels
from gateway.migrate import upgrade

ROOT = Path(__file__).resolve().parents[2]


def seed(url: str, old: int, recent: int) -> None:
    async def go() -> None:
        engine = create_engine(url)
        now = datetime.now(UTC)
        rows = []
        for i in range(old + recent):
            created = now - timedelta(days=40 if i < old else 1)
            rows.append({"request_id": uuid.uuid4().hex, "created_at": created, "finished_at": created,
                         "endpoint": "chat.completions", "stream": False, "status": "ok", "http_status": 200,
                         "request_json": json.dumps({"i": i})})  # fmt: skip
        async with engine.begin() as conn:
            await conn.execute(audit_records.insert(), rows)
            await conn.execute(
                review_labels.insert(),
                [{"request_id": rows[0]["request_id"], "label": "ok", "reviewer": "key_x", "created_at": now},
                 {"request_id": rows[-1]["request_id"], "label": "toxic", "reviewer": "key_x", "created_at": now}],
            )  # fmt: skip
        await engine.dispose()

    asyncio.run(go())


def count(url: str, table: object) -> int:
    async def go() -> int:
        engine = create_engine(url)
        async with engine.connect() as conn:
            value = (await conn.execute(select(func.count()).select_from(table))).scalar_one()  # type: ignore[arg-type]
        await engine.dispose()
        return int(value)

    return asyncio.run(go())


def test_prune_archives_then_deletes_in_batches(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    seed(url, old=2500, recent=30)
    env = {**os.environ, "GATEWAY_DATABASE": url, "GATEWAY_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "db", "prune", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    dry = cli("--older-than", "30", "--dry-run")
    assert dry.returncode == 0 and "would delete 2500 audit records" in dry.stdout
    assert count(url, audit_records) == 2530

    archive = tmp_path / "archive" / "audit.jsonl"
    done = cli("--older-than", "30", "--batch", "1000", "--archive", str(archive))
    assert done.returncode == 0, done.stderr
    assert "deleted 2500 audit records and 1 labels" in done.stdout and "in 3 batches" in done.stdout
    assert count(url, audit_records) == 30 and count(url, review_labels) == 1  # the recent label stays
    archived = [json.loads(line) for line in archive.read_text().splitlines()]
    assert len(archived) == 2500 and archived[0]["labels"][0]["label"] == "ok"
    again = cli("--older-than", "30")
    assert "deleted 0 audit records" in again.stdout
    assert cli("--older-than", "-1").returncode == 2
