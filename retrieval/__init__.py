"""Retrieval: chunking, embeddings, FAISS indexes, ingestion and search."""
