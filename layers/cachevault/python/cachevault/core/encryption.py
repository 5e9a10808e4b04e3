"""Server-side encryption every snapshot object is written with (template parameter SnapshotEncryption).

Globals set ``SNAPSHOT_ENCRYPTION`` (``SSE-S3`` default | ``SSE-KMS``) and
``SNAPSHOT_KMS_KEY_ID``; each write asks for it explicitly, so an object is encrypted
the same way even in a bucket whose default encryption differs (a user's export bucket).
"""

from __future__ import annotations

import os

from cachevault.core.errors import InvalidParameterValue

SSE_S3 = "SSE-S3"
SSE_KMS = "SSE-KMS"


def s3_args() -> dict[str, str]:
    """Extra arguments for PutObject / CreateMultipartUpload / CopyObject."""
    mode = os.environ.get("SNAPSHOT_ENCRYPTION") or SSE_S3
    kms_key = os.environ.get("SNAPSHOT_KMS_KEY_ID") or ""
    if mode == SSE_KMS or kms_key:
        # No key id: S3 uses the account's aws/s3 managed key.
        return {"ServerSideEncryption": "aws:kms", **({"SSEKMSKeyId": kms_key} if kms_key else {})}
    if mode != SSE_S3:
        raise InvalidParameterValue(f"SNAPSHOT_ENCRYPTION must be {SSE_S3} or {SSE_KMS}, not {mode!r}.")
    return {"ServerSideEncryption": "AES256"}
