"""The unit formatters every report shares (``1.2 ms``, ``1.5 KiB``).

A module of their own, with no records in it: auto words its decisions with
them while a cold run is going, and must not load the profiler's records
(frozen dataclasses, costly to create) to do so.
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``0.0000012`` -> ``"1.2 us"``; ``0.25`` -> ``"250 ms"``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
