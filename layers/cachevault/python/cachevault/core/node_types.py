"""ElastiCache node types: the families and sizes CreateReplicationGroup accepts.

From the CacheNodeType documentation in botocore's ``elasticache/2015-02-02/service-2.json``
(current and previous generations), plus the data tiering family ``cache.r6gd`` and the
network-optimized ``cache.c7gn`` that page lists elsewhere. A type outside this table
(``bogus``, ``''``, ``cache.r7g.huge``) is refused with ElastiCache's error.
"""

from __future__ import annotations

from cachevault.core.errors import InvalidParameterValue

_XL = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")
FAMILIES: dict[str, tuple[str, ...]] = {
    # general purpose
    "m7g": ("large", *_XL),
    "m6g": ("large", *_XL),
    "m5": ("large", "xlarge", "2xlarge", "4xlarge", "12xlarge", "24xlarge"),
    "m4": ("large", "xlarge", "2xlarge", "4xlarge", "10xlarge"),
    "m3": ("medium", "large", "xlarge", "2xlarge"),
    "m2": ("xlarge", "2xlarge", "4xlarge"),
    "m1": ("small", "medium", "large", "xlarge"),
    "t4g": ("micro", "small", "medium"),
    "t3": ("micro", "small", "medium"),
    "t2": ("micro", "small", "medium"),
    "t1": ("micro",),
    # memory optimized
    "r7g": ("large", *_XL),
    "r6g": ("large", *_XL),
    "r6gd": ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"),  # data tiering
    "r5": ("large", "xlarge", "2xlarge", "4xlarge", "12xlarge", "24xlarge"),
    "r4": ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge"),
    "r3": ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge"),
    # compute / network optimized
    "c7gn": ("large", *_XL),
    "c1": ("xlarge",),
}


def node_type(raw: object) -> str:
    """``raw`` if it is a known ElastiCache node type (``cache.<family>.<size>``), else refused."""
    if not isinstance(raw, str):
        raise InvalidParameterValue(f"CacheNodeType must be a string, not {type(raw).__name__}.")
    prefix, _, rest = raw.partition(".")
    family, _, size = rest.partition(".")
    if prefix == "cache" and size in FAMILIES.get(family, ()):
        return raw
    if prefix == "cache" and family in FAMILIES:
        raise InvalidParameterValue(
            f"Invalid CacheNodeType {raw!r}: family cache.{family} comes in sizes "
            f"{', '.join(FAMILIES[family])}."
        )
    raise InvalidParameterValue(
        f"Invalid CacheNodeType {raw!r}: it must be cache.<family>.<size>, with a family among "
        f"{', '.join(sorted(FAMILIES))} (for example cache.r7g.large)."
    )
