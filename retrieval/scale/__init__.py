"""Indexing beyond one process: shards, Ray, and merging shards into an index."""
