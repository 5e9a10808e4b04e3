"""Which buckets a snapshot may be exported to, and who must own them.

The template's ``ExportBucketAllowList`` parameter reaches every function as
``EXPORT_BUCKET_ALLOW_LIST`` (comma separated; an entry ending in ``*`` allows a name
prefix, as the IAM policy built from the same list does) and ``ExportBucketOwner`` as
``EXPORT_BUCKET_OWNER`` (default: the stack's account). Every request cachevault makes to
an export bucket carries ``ExpectedBucketOwner``, so a bucket re-created by another account
under an allowed name is never written to.
"""

from __future__ import annotations

import fnmatch
import os

from cachevault.core.errors import InvalidParameterValue

ALLOW_LIST_ENV = "EXPORT_BUCKET_ALLOW_LIST"
OWNER_ENV = "EXPORT_BUCKET_OWNER"


def allow_list() -> list[str]:
    entries = [e.strip() for e in os.environ.get(ALLOW_LIST_ENV, "").split(",")]
    # "*" alone (any bucket) is what the allow-list exists to prevent.
    return [e for e in entries if e and e.strip("*")]


def check_allowed(bucket: str) -> str:
    """``bucket`` if the deployment allows exports into it, else InvalidParameterValue."""
    allowed = allow_list()
    if not allowed:
        raise InvalidParameterValue(
            f"Export to S3 bucket {bucket!r} refused: this deployment allows no export buckets "
            "(template parameter ExportBucketAllowList is empty)."
        )
    if not any(fnmatch.fnmatchcase(bucket, entry) if entry.endswith("*") else bucket == entry for entry in allowed):
        raise InvalidParameterValue(
            f"Export to S3 bucket {bucket!r} refused: it is not in this deployment's ExportBucketAllowList "
            f"({', '.join(allowed)})."
        )
    return bucket


def owner_args() -> dict[str, str]:
    """``{"ExpectedBucketOwner": account}`` for every call on an export bucket ({} if unset)."""
    owner = os.environ.get(OWNER_ENV, "").strip()
    return {"ExpectedBucketOwner": owner} if owner else {}
