"""`gateway rollout history` and `gateway rollout rollback [VERSION]`: the stored config versions."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings, open_engine

if TYPE_CHECKING:
    from gateway.rollout import ConfigStore


def configure_parser(commands: Any, common: Any) -> None:
    """Add `rollout history` and `rollout rollback` to the `gateway` parser (`common` adds --config & co)."""
    rollout = commands.add_parser("rollout", help="config versions: history and rollback").add_subparsers(
        dest="rollout_command", required=True
    )
    history = rollout.add_parser("history", help="every applied config, newest first (* marks the live one)")
    common(history)
    history.add_argument("--limit", type=int, default=20)
    history.set_defaults(func=cmd_history)
    rollback = rollout.add_parser(
        "rollback", help="make a stored config live again on every replica (default: the one before the live one)"
    )
    common(rollback)
    rollback.add_argument("version", nargs="?", default=None, help="a stored version (or a unique prefix)")
    rollback.set_defaults(func=cmd_rollback)


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.migrate import upgrade
    from gateway.rollout import ConfigStore

    upgrade(settings.database_url)

    async def go() -> list[dict[str, Any]]:
        async with open_engine(settings) as engine:
            return await ConfigStore(engine).history(args.limit)

    rows = asyncio.run(go())
    if not rows:
        print("no config has been applied yet (a gateway stores its config when it starts)")
        return 0
    print("  applied (UTC)        version       action    policy        host                      deployments")
    for i, row in enumerate(rows):
        live = "*" if i == 0 else " "
        applied = row["applied_at"].strftime("%Y-%m-%d %H:%M:%S")
        print(f"{live} {applied}  {row['version']:<12}  {row['action']:<8}  {row['policy_version'] or '':<12}  "
              f"{(row['host'] or '')[:24]:<24}  {row['summary']}")  # fmt: skip
    return 0


async def _previous(store: ConfigStore) -> str | None:
    """The version that was live before the live one (skipping re-applications of the live one)."""
    history = await store.history(200)
    if not history:
        return None
    live = history[0]["version"]
    return next((str(row["version"]) for row in history if row["version"] != live), None)


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.migrate import upgrade
    from gateway.rollout import ConfigStore

    upgrade(settings.database_url)

    async def go() -> tuple[int, str]:
        async with open_engine(settings) as engine:
            store = ConfigStore(engine)
            version = args.version or await _previous(store)
            if version is None:
                return 1, "no earlier config to roll back to"
            snapshot = await store.get(version)
            if snapshot is None:
                return (
                    1,
                    f"no stored config version {version!r} (or the prefix is not unique): "
                    "see `gateway rollout history`",
                )
            if snapshot.version == await store.live():
                return 0, f"config {snapshot.version} is already live ({snapshot.summary()})"
            await store.publish(snapshot, "rollback", f"cli@{socket.gethostname()}")
            return 0, (f"config {snapshot.version} is live again ({snapshot.summary()}); "
                       f"every replica applies it within {settings.config_poll:g} s")  # fmt: skip

    code, message = asyncio.run(go())
    print(message, file=sys.stderr if code else sys.stdout)
    return code
