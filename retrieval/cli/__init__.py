"""The `retrieval` command line."""
