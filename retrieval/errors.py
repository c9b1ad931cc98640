"""The retrieval package's error tree.

RetrievalError                 base class: anything this package raises on purpose
├── UnknownCollection          a search or delete named a collection that has no index
├── InvalidCollectionName      a collection name that cannot be used as a folder name
├── EmbeddingMismatch          a collection was built with another embedding model
├── IndexCorrupt               an index folder on disk could not be read
├── SchemaMissing              the database lacks the rag_ tables (run `gateway db upgrade`)
├── StorageUnreachable         the index storage root (a folder or s3://bucket/prefix) cannot be used
├── ConcurrentPublish          another ingest published a version of the collection meanwhile
└── LoaderError                one file could not be turned into documents (ingest skips it)
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class of every error the retrieval package raises on purpose."""


class UnknownCollection(RetrievalError):
    """The named collection has no index on disk."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown collection {name!r}")
        self.name = name


class InvalidCollectionName(RetrievalError):
    """A collection name must be 1-64 characters of letters, digits, '_', '-' or '.'."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"invalid collection name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
        self.name = name


class EmbeddingMismatch(RetrievalError):
    """The collection's vectors come from a different embedding model than the one in use."""

    def __init__(self, collection: str, built_with: str, using: str) -> None:
        super().__init__(
            f"collection {collection!r} was built with embedding model {built_with!r}, "
            f"but {using!r} is in use; re-ingest it with that model or delete it first"
        )
        self.collection = collection
        self.built_with = built_with
        self.using = using


class IndexCorrupt(RetrievalError):
    """An index version on disk is missing files or cannot be parsed."""


class SchemaMissing(RetrievalError):
    """The database lacks tables retrieval writes to: its schema is older than this code's."""

    def __init__(self, database: str, tables: list[str]) -> None:
        super().__init__(
            f"database {database} has no table {', '.join(tables)}: bring its schema up to date with "
            "`gateway db upgrade` (the gateway's Alembic migrations own the schema)"
        )
        self.database = database
        self.tables = tables


class StorageUnreachable(RetrievalError):
    """The index storage root cannot be reached or used; the message names it."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"index storage {uri} is unreachable: {reason}")
        self.uri = uri
        self.reason = reason


class ConcurrentPublish(RetrievalError):
    """Another ingest published a new version of the collection while this one ran."""

    def __init__(self, collection: str) -> None:
        super().__init__(
            f"another ingest published a new version of collection {collection!r} while this one ran; "
            "nothing was published, run it again"
        )
        self.collection = collection


class LoaderError(RetrievalError):
    """A file could not be loaded; `reason` is a short phrase for the ingest summary."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
