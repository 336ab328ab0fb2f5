"""Cross-modal retrieval."""
