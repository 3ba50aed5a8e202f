"""Byte counts for people, in the messages about disk and memory (preflight's checks, a checkpoint's failed save)."""


def size(b: float) -> str:
    """Bytes for people: 812 B, 4.1 MiB, 15.3 GiB."""
    for unit, k in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= k:
            return f"{b / k:.1f} {unit}"
    return f"{int(b)} B"
