"""boto3 clients for whichever AWS the environment points at.

boto3 honours ``AWS_ENDPOINT_URL`` itself (embedded moto server, LocalStack, or unset
for real AWS). ``CACHEVAULT_TARGET=localstack`` uses localstack-client's session so a
user with Docker gets LocalStack's conventional endpoint without setting anything.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
from botocore.config import Config

_RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"})


def session() -> Any:
    if os.environ.get("CACHEVAULT_TARGET") == "localstack":
        import localstack_client.session

        return localstack_client.session.Session()
    return boto3.session.Session()


def client(service: str) -> Any:
    return session().client(service, config=_RETRIES)


def resource(service: str) -> Any:
    return session().resource(service, config=_RETRIES)
