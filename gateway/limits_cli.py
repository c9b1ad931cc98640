"""CLI pieces for limits and usage: the limit flags of `keys create/update`, `keys update`, `usage`.

`gateway/cli.py` mounts these; they live here so the limits feature stays in one place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from gateway.limits import LIMIT_COLUMNS, KeyLimits, parse_limit
from gateway.settings import Settings, open_engine

_HELP = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute (prompt + completion)",
    "max_concurrent": "requests in flight at once",
    "tokens_per_day": "token quota per UTC day",
    "tokens_per_month": "token quota per UTC month",
}


def _limit_type(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_limit(name, text) or 0
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """--rpm, --tpm, --max-concurrent, --tokens-per-day, --tokens-per-month (0: no limit)."""
    for name in LIMIT_COLUMNS:
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=_limit_type(name), default=None, metavar="N",
            help=f"{_HELP[name]} (0: no limit)",
        )  # fmt: skip


def limits_from_args(args: argparse.Namespace, current: KeyLimits | None = None) -> KeyLimits:
    """The flags given, over the key's current limits."""
    values = (current or KeyLimits()).columns()
    for name in LIMIT_COLUMNS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given or None
    return KeyLimits(**values)


def limits_text(row: dict[str, Any]) -> str:
    """`rpm=600 tpm=200000` for a `keys list` row."""
    return KeyLimits(**{name: row.get(name) for name in LIMIT_COLUMNS}).describe()


def cmd_keys_update(args: argparse.Namespace, settings: Settings) -> int:
    """Change a key's limits; unknown key id: exit 1."""
    from gateway.auth import KeyStore
    from gateway.migrate import upgrade

    upgrade(settings.database_url)
    if all(getattr(args, name) is None for name in LIMIT_COLUMNS):
        print("gateway: nothing to change: give --rpm, --tpm, --max-concurrent, --tokens-per-day or "
              "--tokens-per-month (0 removes a limit)", file=sys.stderr)  # fmt: skip
        return 2

    async def go() -> KeyLimits | None:
        async with open_engine(settings) as engine:
            store = KeyStore(engine)
            row = next((r for r in await store.list() if r["id"] == args.key_id), None)
            if row is None:
                return None
            current: dict[str, Any] = {name: row.get(name) for name in LIMIT_COLUMNS}
            limits = limits_from_args(args, KeyLimits(**current))
            await store.update_limits(args.key_id, limits)
            return limits

    limits = asyncio.run(go())
    if limits is None:
        print(f"gateway: no key with id {args.key_id!r} (see `gateway keys list`)", file=sys.stderr)
        return 1
    print(f"updated {args.key_id}: {limits.describe()} (every replica applies it within 30 s)")
    return 0


def configure_usage_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="24h", help="a duration (30m, 24h, 7d, 2w) or an ISO date (default 24h)")
    parser.add_argument("--by", choices=["key", "model", "day"], default="key", help="how to group (default key)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--origin",
        choices=["live", "eval", "all"],
        default="live",
        help="live traffic (default: eval runs' requests left out), only eval runs', or all",
    )


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    """Requests, tokens, blocked, rate-limited, errors, p50/p95 latency from the audit log."""
    from gateway.migrate import upgrade
    from gateway.usage import format_table, parse_since, usage

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    upgrade(settings.database_url)

    async def go() -> list[Any]:
        async with open_engine(settings) as engine:
            return await usage(engine, since, args.by, origin=args.origin)

    rows = asyncio.run(go())
    if args.json:
        body = {"since": since.isoformat(), "by": args.by, "origin": args.origin, "rows": [r.public() for r in rows]}
        print(json.dumps(body, indent=1))
    else:
        origin = "" if args.origin == "live" else f" (origin: {args.origin})"
        print(f"usage since {since.isoformat(timespec='seconds')} by {args.by}{origin}")
        print(format_table(rows, args.by))
    return 0
