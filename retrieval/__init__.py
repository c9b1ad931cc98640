"""Retrieval: chunking, embeddings, FAISS indexes, ingestion and search.

Heavy libraries (torch, sentence-transformers, faiss, pypdf, bs4) are imported where they are
used, so importing this package is cheap.
"""

from retrieval.chunking import ChunkingOptions
from retrieval.documents import Chunk, Document, Hit, Skipped
from retrieval.embedders import (
    Embedder,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    create_embedder,
    create_embedder_async,
)
from retrieval.errors import (
    EmbeddingMismatch,
    IndexCorrupt,
    InvalidCollectionName,
    LoaderError,
    RetrievalError,
    StorageUnreachable,
    UnknownCollection,
)
from retrieval.index import IndexConfig
from retrieval.ingest import Ingestor, IngestReport
from retrieval.objectstore import IndexSync, is_object_storage
from retrieval.prompt import DEFAULT_INSTRUCTION, build_rag_messages, citations, retrieval_query
from retrieval.sample import SAMPLE_COLLECTION, ensure_sample_collection
from retrieval.store import CollectionStore, SearchOutcome

__all__ = [
    "DEFAULT_INSTRUCTION",
    "SAMPLE_COLLECTION",
    "Chunk",
    "ChunkingOptions",
    "CollectionStore",
    "Document",
    "Embedder",
    "EmbeddingMismatch",
    "HashingEmbedder",
    "Hit",
    "IndexConfig",
    "IndexCorrupt",
    "IndexSync",
    "IngestReport",
    "Ingestor",
    "InvalidCollectionName",
    "LoaderError",
    "RetrievalError",
    "SearchOutcome",
    "SentenceTransformerEmbedder",
    "Skipped",
    "StorageUnreachable",
    "UnknownCollection",
    "build_rag_messages",
    "citations",
    "create_embedder",
    "create_embedder_async",
    "ensure_sample_collection",
    "is_object_storage",
    "retrieval_query",
]
