"""`gateway ingest`: the argument parser and the command, mounted by gateway.cli.

    gateway ingest PATH... --collection NAME [--delete] [--chunk-tokens N] [--overlap-tokens N]
                   [--index-type auto|flat|hnsw|ivf] [--embedding-model PATH_OR_NAME] [--json]

The top-level CLI (gateway.cli) passes an `IngestTarget` built from its settings (data dir,
database URL, embedding model) and brings the database's schema up to date (Alembic) before it
calls `run_ingest`; a caller that does not passes `ensure_schema` (see `Ingestor.open`). Plain
data, so that retrieval never imports the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from retrieval.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS, ChunkingOptions
from retrieval.embedders import Embedder, create_embedder
from retrieval.errors import RetrievalError
from retrieval.index import INDEX_KINDS, IndexConfig
from retrieval.ingest import Ingestor, IngestReport, SchemaHook
from retrieval.loaders import iter_files


@dataclass(frozen=True, slots=True)
class IngestTarget:
    """Where ingestion writes and with which model: the parts of the settings it needs."""

    data_dir: Path
    database: str | None = None  # a SQLAlchemy URL; None: SQLite at DATA_DIR/gateway.db
    embedding_model: str | None = None  # None: the bundled all-MiniLM-L6-v2; "hashing": the fake
    index_storage: str | None = None  # "s3://bucket/prefix": publish there (data_dir is a cache); None: data_dir
    s3_endpoint_url: str | None = None  # an S3-compatible server; None: boto3's AWS_* settings
    embedding_runtime: str = "auto"  # what runs a real model: "auto" (ONNX, else PyTorch), "onnx", "torch"
    onnx_cache: Path | None = None  # where ONNX exports are kept; None: the user cache

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> IngestTarget:
        """For callers without settings: `args.data_dir`, `args.database`, `--embedding-model`."""
        return cls(
            Path(args.data_dir),
            getattr(args, "database", None),
            args.embedding_model,
            getattr(args, "index_storage", None),
            getattr(args, "s3_endpoint_url", None),
        )


def configure_ingest_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Ingest files and folders (.txt .md .rst .html .pdf .docx .csv .tsv .json .jsonl) into a collection."
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or folders to ingest (with --delete: document ids or paths)"
    )
    parser.add_argument("--collection", required=True, help="collection name (letters, digits, _ - .)")
    parser.add_argument(
        "--delete", action="store_true", help="remove the documents named by PATH (ids, paths, or folder prefixes)"
    )
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help=f"chunk size in embedding-model tokens (default {DEFAULT_CHUNK_TOKENS})",
    )
    parser.add_argument(
        "--overlap-tokens",
        type=int,
        default=DEFAULT_OVERLAP_TOKENS,
        help=f"tokens shared by consecutive chunks (default {DEFAULT_OVERLAP_TOKENS})",
    )
    parser.add_argument(
        "--index-type",
        choices=INDEX_KINDS,
        default="auto",
        help="FAISS index type; auto picks by collection size (default auto)",
    )
    parser.add_argument(
        "--embedding-model",
        default=None,
        metavar="PATH_OR_NAME",
        help="sentence-transformers model folder or name, or hashing (default: the embedding_model setting, "
        "else the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--index-storage",
        default=None,
        metavar="PATH_OR_S3_URL",
        help="where the index files go: a folder or s3://BUCKET/PREFIX (default: the index_storage setting, "
        "else DATA_DIR); with s3:// the data dir is only a local cache, and the database names the live version",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_ingest(
    args: argparse.Namespace, target: IngestTarget | None = None, *, ensure_schema: SchemaHook | None = None
) -> int:
    """Run `gateway ingest`; returns the exit status (0 ok, 1 nothing ingested or error, 2 usage)."""
    target = target or IngestTarget.from_args(args)
    try:
        chunking = ChunkingOptions(args.chunk_tokens, args.overlap_tokens)
    except ValueError as exc:
        print(f"gateway ingest: {exc}", file=sys.stderr)
        return 2
    try:
        embedder = create_embedder(
            target.embedding_model, runtime=target.embedding_runtime, cache_dir=target.onnx_cache
        )
    except (OSError, ValueError) as exc:
        print(f"gateway ingest: cannot load embedding model {target.embedding_model!r}: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run(args, target, embedder, chunking, ensure_schema))
    except (RetrievalError, ValueError) as exc:
        print(f"gateway ingest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary(), file=sys.stderr)
    nothing_done = report.ingested == 0 and report.unchanged == 0 and report.deleted == 0
    return 1 if nothing_done and report.skipped else 0


async def _run(
    args: argparse.Namespace,
    target: IngestTarget,
    embedder: Embedder,
    chunking: ChunkingOptions,
    ensure_schema: SchemaHook | None,
) -> IngestReport:
    try:
        ingestor = await Ingestor.open(
            target.data_dir,
            target.database,
            embedder,
            chunking=chunking,
            index_config=IndexConfig(kind=args.index_type),
            progress=not args.no_progress and sys.stderr.isatty(),
            ensure_schema=ensure_schema,
            index_storage=target.index_storage,
            endpoint_url=target.s3_endpoint_url,
        )
        async with ingestor:
            if args.delete:
                return await ingestor.delete_documents(args.collection, _delete_targets(args.paths))
            return await ingestor.ingest_paths(args.collection, [Path(p) for p in args.paths])
    finally:
        await embedder.aclose()


def _delete_targets(values: list[str]) -> list[str]:
    """Existing paths name the documents they would ingest as; anything else is an id or prefix."""
    targets: list[str] = []
    for value in values:
        path = Path(value)
        if path.exists():
            loaded = [d.id for f in iter_files([path]) for d in f.documents]
            targets.extend(loaded or [path.name])
        else:
            targets.append(value)
    return targets
