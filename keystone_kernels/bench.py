"""Benchmarks against dense AdamW (filled in by the benchmark work; see bench/README.md)."""

from __future__ import annotations


def add_bench_command(sub) -> None:
    """Register ``keystone-kernels bench`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="speed and memory against dense AdamW (not implemented yet)")
    p.set_defaults(func=lambda args: (print("bench: not implemented yet"), 1)[1])
