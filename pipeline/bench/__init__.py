"""Benchmarks: scripts that measure and print a figure against a reference in the same process.

Run ``python -m pipeline.bench <name> [--help]``; each benchmark is a module
here with a ``main(argv) -> int`` function.
"""
