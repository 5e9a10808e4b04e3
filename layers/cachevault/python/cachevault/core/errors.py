"""Errors that speak ElastiCache's language.

Each error carries the ElastiCache fault code (``SnapshotAlreadyExistsFault`` ...) as
its ``code`` and the HTTP status ElastiCache answers with, so the CLI, the HTTP API and
Step Functions (which sees the exception class name as the error type) all report the
same thing an AWS CLI user already knows.
"""

from __future__ import annotations

from typing import Any


class CacheVaultError(Exception):
    """Base class: ``code`` is the ElastiCache-style error code."""

    code = "InternalFailure"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"Code": self.code, "Message": self.message}
        if self.details:
            body["Details"] = self.details
        return body


def _fault(name: str, status: int = 400, code: str | None = None) -> type[CacheVaultError]:
    # Class name == error code so Step Functions' ErrorEquals and Catch match on it.
    return type(name, (CacheVaultError,), {"code": code or name, "http_status": status})


SnapshotAlreadyExistsFault = _fault("SnapshotAlreadyExistsFault")
SnapshotNotFoundFault = _fault("SnapshotNotFoundFault", 404)
SnapshotQuotaExceededFault = _fault("SnapshotQuotaExceededFault")
SnapshotFeatureNotSupportedFault = _fault("SnapshotFeatureNotSupportedFault")
InvalidSnapshotState = _fault("InvalidSnapshotState", code="InvalidSnapshotStateFault")
ReplicationGroupNotFoundFault = _fault("ReplicationGroupNotFoundFault", 404)
ReplicationGroupAlreadyExistsFault = _fault("ReplicationGroupAlreadyExistsFault")
InvalidReplicationGroupState = _fault("InvalidReplicationGroupState", code="InvalidReplicationGroupStateFault")
InvalidParameterValue = _fault("InvalidParameterValue", code="InvalidParameterValueException")
InvalidParameterCombination = _fault(
    "InvalidParameterCombination", code="InvalidParameterCombinationException"
)
InvalidS3Location = _fault("InvalidS3Location", code="InvalidARN")
CaptureFailed = _fault("CaptureFailed", 500)
RestoreFailed = _fault("RestoreFailed", 500)
ChecksumMismatch = _fault("ChecksumMismatch", 500, code="SnapshotChecksumMismatch")
RdbFormatError = _fault("RdbFormatError", 400, code="InvalidRdbFormat")
FinalSnapshotFailed = _fault("FinalSnapshotFailed", 500)
ImportNotFoundFault = _fault("ImportNotFoundFault", 404)
# API Gateway refuses a payload over 10 MB with 413 before any integration runs.
RequestEntityTooLarge = _fault("RequestEntityTooLarge", 413)
NodeQuotaForClusterExceededFault = _fault("NodeQuotaForClusterExceededFault")
