"""The sample corpus that ships with the package, and `ensure_sample_collection`.

The corpus describes a fictional company (Kestrel Home Robotics) in a dozen short documents
of mixed formats; `questions.jsonl` labels 40+ questions with the document that answers them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from retrieval import storage
from retrieval.embedders import Embedder, create_embedder_async
from retrieval.errors import ConcurrentPublish
from retrieval.ingest import Ingestor, IngestReport, SchemaHook

logger = logging.getLogger(__name__)

SAMPLE_COLLECTION = "sample"
SAMPLE_CORPUS_DIR = Path(__file__).resolve().parent / "sample_corpus"
SAMPLE_DOCUMENTS_DIR = SAMPLE_CORPUS_DIR / "documents"
SAMPLE_QUESTIONS = SAMPLE_CORPUS_DIR / "questions.jsonl"


def _built_with(data_dir: Path, collection: str) -> str | None:
    """The embedding model of the collection's live version, or None if it has none."""
    coll_dir = storage.collection_dir(data_dir, collection)
    version = storage.read_pointer(coll_dir)
    if version is None:
        return None
    try:
        manifest = json.loads((coll_dir / version / "manifest.json").read_text())
        return str(manifest["embedding_model"])
    except (OSError, ValueError, KeyError):
        return ""  # unreadable: treat as built by something else, so it is rebuilt


async def ensure_sample_collection(
    data_dir: Path,
    database_url: str | None = None,
    embedder: Embedder | None = None,
    *,
    collection: str = SAMPLE_COLLECTION,
    ensure_schema: SchemaHook | None = None,
    index_storage: str | None = None,
    endpoint_url: str | None = None,
) -> IngestReport | None:
    """Ingest the sample corpus into `collection` unless it already exists (built with `embedder`).

    Returns the ingest report, or None when there was nothing to do. Pass the gateway's
    embedder so the model is not loaded twice (None loads the default model off the loop).
    `database_url` None means SQLite at DATA_DIR/gateway.db; its schema must be up to date, or
    `ensure_schema` given (see `Ingestor.open`). `index_storage` / `endpoint_url`: object
    storage, as for `Ingestor.open` (data_dir is then the local cache, already synced); if
    another replica publishes the sample at the same moment, its version stands (None).
    """
    existing_model = _built_with(Path(data_dir), collection)
    if existing_model is not None and (embedder is None or existing_model == embedder.name):
        return None
    own = embedder is None
    active = embedder or await create_embedder_async()
    try:
        ingestor = await Ingestor.open(
            Path(data_dir),
            database_url,
            active,
            ensure_schema=ensure_schema,
            index_storage=index_storage,
            endpoint_url=endpoint_url,
        )
        async with ingestor:
            if existing_model is not None:
                # only the shipped sample is rebuilt like this: operators' collections never are
                logger.warning(
                    "sample collection %r was built with %r; rebuilding it with %r",
                    collection,
                    existing_model,
                    active.name,
                )
                await ingestor.drop_collection(collection)
            try:
                report = await ingestor.ingest_paths(collection, [SAMPLE_DOCUMENTS_DIR])
            except ConcurrentPublish:
                logger.info("sample collection %r: another replica published it first", collection)
                return None
    finally:
        if own:
            await active.aclose()
    if not report.ingested:  # another worker or replica ingested it a moment before: nothing new
        logger.info("sample collection %r: already up to date (%d chunks)", collection, report.total_chunks)
        return report
    logger.info(
        "sample collection %r: %d documents, %d chunks in %.1f s",
        collection,
        report.ingested,
        report.total_chunks,
        report.seconds,
    )
    return report
