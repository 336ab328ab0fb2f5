"""Evaluation: recall@k, ranks, mAP, threshold reports, classification, plots (numpy and matplotlib)."""
