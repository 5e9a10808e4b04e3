"""ElastiCache naming rules for caches (replication groups) and snapshots.

Names are case-insensitive and stored lowercase, as ElastiCache does. The rules are the
ones the CreateReplicationGroup / CreateSnapshot API documents: start with a letter,
ASCII letters, digits and hyphens only, no two consecutive hyphens, no trailing hyphen.
Automatic snapshots carry the reserved ``automatic.`` prefix.
"""

from __future__ import annotations

import re

from cachevault.core.errors import InvalidParameterValue

_NAME = re.compile(r"^[a-z](?:[a-z0-9]|-(?!-))*(?<!-)$")
AUTOMATIC_PREFIX = "automatic."
CACHE_NAME_MAX = 40
SNAPSHOT_NAME_MAX = 255


def _fold(raw: str | None, field: str) -> str:
    """Strip and lowercase an ASCII name; anything else is refused before folding.

    ``str.lower`` maps some non-ASCII letters onto ASCII ones (the Kelvin sign U+212A
    becomes ``k``): folding first would accept a name ElastiCache refuses.
    """
    if raw is not None and not isinstance(raw, str):
        raise InvalidParameterValue(f"{field} must be a string, not {type(raw).__name__}.")
    raw = raw or ""
    if not raw.isascii():
        bad = next(c for c in raw if not c.isascii())
        raise InvalidParameterValue(
            f"{field} {raw!r} is invalid: it contains the non-ASCII character {bad!r} "
            f"(U+{ord(bad):04X}); only ASCII letters, digits and hyphens are allowed."
        )
    return raw.strip().lower()


def cache_name(raw: str) -> str:
    name = _fold(raw, "ReplicationGroupId")
    _check(name, "ReplicationGroupId", CACHE_NAME_MAX)
    return name


def snapshot_name(raw: str, *, automatic: bool = False) -> str:
    name = _fold(raw, "SnapshotName")
    if name.startswith(AUTOMATIC_PREFIX):
        if not automatic:
            raise InvalidParameterValue(
                f"SnapshotName {raw!r} is invalid: the prefix {AUTOMATIC_PREFIX!r} is reserved "
                "for automatic snapshots."
            )
        _check(name[len(AUTOMATIC_PREFIX) :], "SnapshotName", SNAPSHOT_NAME_MAX - len(AUTOMATIC_PREFIX))
        return name
    _check(name, "SnapshotName", SNAPSHOT_NAME_MAX)
    return name


def _check(name: str, field: str, max_len: int) -> None:
    if not name or len(name) > max_len:
        raise InvalidParameterValue(f"{field} must be 1 to {max_len} characters long, got {len(name)}.")
    if not _NAME.match(name):
        raise InvalidParameterValue(
            f"{field} {name!r} is invalid: it must begin with a letter, contain only ASCII letters, "
            "digits and hyphens, and must not end with a hyphen or contain two consecutive hyphens."
        )
