"""Embedder, Milvus store, the memory tool server and its clients."""
