"""boto3 clients for whichever AWS the environment points at.

boto3 honours ``AWS_ENDPOINT_URL`` itself (embedded moto server, LocalStack, or unset
for real AWS). ``CACHEVAULT_TARGET=localstack`` uses localstack-client's session so a
user with Docker gets LocalStack's conventional endpoint without setting anything.

Clients are cached per (service, endpoint, region, credentials), and made from one boto3
Session per (endpoint, region, credentials): a new Session costs 50-130 ms, which dominated
every short step, and the clients of one Session share what it has loaded (endpoint,
partition and retry data, service models). Measured in a fresh interpreter: a DynamoDB
resource and S3, Step Functions and DynamoDB clients took 1.38-1.47 s with a Session each,
0.32-0.44 s from one; a cold Lambda environment pays it on its first invocation. boto3
clients are thread-safe; sessions are not, so creation happens under a lock.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config

_RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"})
# S3 bodies go unsigned (x-amz-content-sha256: UNSIGNED-PAYLOAD), as botocore already sends
# uploads to AWS over HTTPS (with their CRC32 as a trailer). Without this, an http://
# endpoint (the embedded AWS) has the client hash every byte with SHA-256 once more just for
# the signature (README, Benchmarks). Integrity does not rest on it: AWS checks each part's
# CRC32, and every read of a snapshot checks the snapshot's own SHA-256.
_S3 = _RETRIES.merge(Config(s3={"payload_signing_enabled": False}))
_lock = threading.Lock()
_cache: dict[tuple[str, ...], Any] = {}
_sessions: dict[tuple[str, ...], Any] = {}  # keyed like _cache, without kind and service


def session() -> Any:
    if os.environ.get("CACHEVAULT_TARGET") == "localstack":
        try:
            import localstack_client.session
        except ImportError as exc:  # an extra, not a runtime dependency: no Lambda uses it
            from cachevault.core.errors import CacheVaultError

            raise CacheVaultError(
                "CACHEVAULT_TARGET=localstack needs localstack-client: pip install 'cachevault[localstack]'"
            ) from exc

        return localstack_client.session.Session()
    return boto3.session.Session()


def _key(kind: str, service: str) -> tuple[str, ...]:
    env = os.environ
    return (
        kind,
        service,
        env.get("CACHEVAULT_TARGET", ""),
        env.get("AWS_ENDPOINT_URL", ""),
        env.get("AWS_REGION", env.get("AWS_DEFAULT_REGION", "")),
        env.get("AWS_ACCESS_KEY_ID", ""),
        env.get("AWS_PROFILE", ""),
    )


def _cached(kind: str, service: str) -> Any:
    key = _key(kind, service)
    with _lock:
        if key not in _cache:
            shared = _sessions.get(key[2:])
            if shared is None:
                shared = _sessions[key[2:]] = session()
            make = shared.client if kind == "client" else shared.resource
            _cache[key] = make(service, config=_S3 if service == "s3" else _RETRIES)
        return _cache[key]


def client(service: str) -> Any:
    return _cached("client", service)


def resource(service: str) -> Any:
    return _cached("resource", service)
