"""The index: the SQLite store, derived FAISS and memory-mapped files, building, searching."""
