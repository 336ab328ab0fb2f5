"""Whole jobs (train, evaluate, calibrate, classify, demo) for the CLI, the server and the Python API."""
