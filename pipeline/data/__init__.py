"""Datasets: records, splits, windows and the synthetic default."""
