"""One unit system for every human-readable size and rate: IEC (KiB, MiB, GiB, TiB)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def iec_bytes(n: float) -> str:
    """``163.6 MiB``; whole bytes below 1 KiB (``512 B``)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iec_rate(bytes_per_second: float) -> str:
    return f"{iec_bytes(bytes_per_second)}/s"
