"""The embedded S3 kept across restarts and crashes: a record per committed object, bodies left in place.

:mod:`cachevault_tools.local.s3_files` already writes every body as a file under
``$CACHEVAULT_HOME/s3/``. This module adds what a restart needs to find them again:

* ``s3/records/<sha256 of bucket and key>.json``: one record per committed object (its body
  file, or a completed multipart upload's part files in order; size, ETag incl. a multipart
  ``-N`` ETag, user metadata and content type, SSE fields, checksum, storage class,
  last-modified, lock fields, tags), replaced atomically (tmp + ``os.replace``) when a
  PutObject, CopyObject or CompleteMultipartUpload (or a change of its tags, ACL,
  retention) succeeded and before the response leaves, removed with the object;
* ``s3/buckets/<name>.json``: one record per bucket (region, versioning, encryption, policy, tags).

:func:`restore` (at start, after the template is deployed) creates the buckets the stack did
not, and registers every recorded object in moto's backend on its existing file (no copy).
Files no record names (parts of unfinished multipart uploads, bodies of writes cut by a
kill) are removed then. Versioned buckets keep their latest version only (one record per key).
A SIGKILL loses nothing acknowledged: a record is in place (page cache) before the answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cachevault_tools.local import s3_files

LOG = logging.getLogger(__name__)

RECORDS = "records"
BUCKETS = "buckets"
PARTITION = "aws"

# FakeKey attributes a record keeps, as moto names them (moto/s3/models.py, FakeKey.__init__).
KEY_FIELDS = (
    "_storage_class",
    "_version_id",
    "_is_versioned",
    "encryption",
    "kms_key_id",
    "bucket_key_enabled",
    "lock_mode",
    "lock_legal_status",
    "lock_until",
    "checksum_value",
    "checksum_type",
    "checksum_parts",
    "checksum_algorithm",
    "website_redirect_location",
)

_lock = threading.Lock()
_root: Path | None = None  # the s3 dir while records are kept; None: hooks do nothing
_installed = False


def install(directory: Path) -> None:
    """Keep records under ``directory`` (the s3 dir) from now on; patches moto's S3 once."""
    global _root, _installed
    (directory / RECORDS).mkdir(parents=True, exist_ok=True)
    (directory / BUCKETS).mkdir(parents=True, exist_ok=True)
    with _lock:
        _root = directory
        if _installed:
            return
        from moto.s3 import models, responses

        responses.S3Response.key_response = _key_response_patch(responses.S3Response.key_response)  # type: ignore[method-assign]
        responses.S3Response.bucket_response = _bucket_response_patch(responses.S3Response.bucket_response)  # type: ignore[method-assign]
        models.S3Backend.delete_object = _delete_object_patch(models.S3Backend.delete_object)  # type: ignore[method-assign]
        _installed = True


def uninstall() -> None:
    """Stop keeping records, and let the coming reset of moto close bodies without removing them."""
    global _root
    with _lock:
        _root = None
    s3_files.keep_bodies(True)


# ---------------------------------------------------------------------------- records


def _record_path(root: Path, bucket: str, key: str) -> Path:
    digest = hashlib.sha256(f"{bucket}\0{key}".encode()).hexdigest()
    return root / RECORDS / f"{digest}.json"


def write_atomically(path: Path, data: dict[str, Any] | str) -> None:
    """``path`` holds ``data`` (as JSON unless text) or what it held before, never a mix (tmp + rename)."""
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _backend_for(bucket_name: str) -> Any:
    from moto.s3.models import s3_backends

    owner = s3_backends.bucket_accounts.get(bucket_name)  # (partition, account)
    return s3_backends[owner[1]][owner[0]] if owner else None


def sync_object(bucket_name: str, key_name: str) -> None:
    """The record of ``bucket/key`` as moto has it now: written, or removed if there is no object."""
    root = _root
    if root is None:
        return
    from moto.s3.models import FakeKey

    with _lock:
        backend = _backend_for(bucket_name)
        bucket = backend.buckets.get(bucket_name) if backend is not None else None
        key = bucket.keys.get(key_name) if bucket is not None else None
        path = _record_path(root, bucket_name, key_name)
        if isinstance(key, FakeKey) and s3_files.body_files(key._value_buffer) is not None and not key.disposed:
            write_atomically(path, _key_record(backend, bucket_name, key))
        else:
            path.unlink(missing_ok=True)


def _key_record(backend: Any, bucket_name: str, key: Any) -> dict[str, Any]:
    key._value_buffer.flush()
    files = [os.path.basename(name) for name in s3_files.body_files(key._value_buffer) or []]
    return {
        "Bucket": bucket_name,
        "Key": key.name,
        "Account": key.account_id,
        "Region": key.region_name,
        "Body": files[0],
        "BodyFiles": files,  # a completed multipart upload: its part files, in order
        "Size": key.contentsize,
        "ETag": key.etag.strip('"'),
        "LastModified": key.last_modified.isoformat(),
        "Metadata": dict(key.metadata),
        "Tags": backend.tagger.get_tag_dict_for_resource(key.arn),
        "Fields": {name: getattr(key, name, None) for name in KEY_FIELDS},
    }


def sync_bucket(bucket_name: str) -> None:
    """The bucket's record as moto has it now; a deleted bucket takes its object records along."""
    root = _root
    if root is None:
        return
    with _lock:
        backend = _backend_for(bucket_name)
        bucket = backend.buckets.get(bucket_name) if backend is not None else None
        path = root / BUCKETS / f"{bucket_name}.json"
        if bucket is None:
            path.unlink(missing_ok=True)
            return
        policy = bucket.policy
        write_atomically(
            path,
            {
                "Name": bucket_name,
                "Account": bucket.account_id,
                "Region": bucket.region_name,
                "Versioning": bucket.versioning_status,
                "Encryption": bucket.encryption,
                "Policy": policy.decode() if isinstance(policy, bytes) else policy,
                "Tags": backend.tagger.get_tag_dict_for_resource(bucket.arn),
            },
        )


# ---------------------------------------------------------------------------- moto seams


def _mutating(method: str, query: dict[str, Any]) -> bool:
    if method == "PUT":
        return not ("partNumber" in query and "uploadId" in query)  # a part is not an object
    if method == "POST":
        return "uploads" not in query  # CreateMultipartUpload commits nothing
    if method == "DELETE":
        return "uploadId" not in query  # AbortMultipartUpload neither
    return False


def _key_response_patch(original: Any) -> Any:
    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        response = original(self, request, full_url, headers)
        query = parse_qs(urlparse(full_url).query, keep_blank_values=True)
        if _root is not None and _mutating(request.method, query) and response[0] < 300:
            sync_object(self.bucket_name, self.parse_key_name())
        return response

    return key_response


def _bucket_response_patch(original: Any) -> Any:
    def bucket_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        response = original(self, request, full_url, headers)
        if _root is None or response[0] >= 300:
            return response
        name = self.parse_bucket_name_from_url(request, full_url)
        if name and request.method in ("PUT", "DELETE"):
            sync_bucket(name)
        elif name and request.method == "POST" and not self.is_delete_keys():
            # A browser-form upload (POST Object): its key is a form field (moto reads it the same way).
            key = (getattr(self, "querystring", None) or {}).get("key")
            if key:
                sync_object(name, key[0])
        return response

    return bucket_response


def _delete_object_patch(original: Any) -> Any:
    # DeleteObject and each key of DeleteObjects (moto's delete_objects calls delete_object).
    def delete_object(self: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, bucket_name, key_name, *args, **kwargs)
        finally:
            sync_object(bucket_name, key_name)

    return delete_object


# ---------------------------------------------------------------------------- restore


@dataclass
class S3Restored:
    buckets_created: list[str] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0
    dropped_records: list[str] = field(default_factory=list)
    removed_files: int = 0


def restore(directory: Path) -> S3Restored:
    """Buckets and objects of the records under ``directory`` back into moto; stray files removed."""
    report = S3Restored()
    for path in sorted((directory / BUCKETS).glob("*.json")):
        try:
            _restore_bucket(json.loads(path.read_text(encoding="utf-8")), report)
        except (OSError, ValueError, KeyError) as exc:
            LOG.warning("bucket record %s not restored: %s", path.name, exc)
    kept: set[str] = set()
    for path in sorted((directory / RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            why = _restore_object(directory, record)
        except (OSError, ValueError, KeyError) as exc:
            why = f"unreadable ({exc})"
            record = {}
        if why is None:
            kept.update(_body_names(record))
            report.objects += 1
            report.bytes += int(record["Size"])
        else:
            report.dropped_records.append(f"{record.get('Bucket')}/{record.get('Key')}: {why}")
            path.unlink(missing_ok=True)
    kept |= _live_bodies()
    for body in directory.glob(f"{s3_files.BODY_PREFIX}*"):
        if body.name not in kept:
            body.unlink(missing_ok=True)
            report.removed_files += 1
    for tmp in (*(directory / RECORDS).glob(".tmp-*"), *(directory / BUCKETS).glob(".tmp-*")):
        tmp.unlink(missing_ok=True)
    return report


def _restore_bucket(record: dict[str, Any], report: S3Restored) -> None:
    from moto.s3.models import s3_backends

    name = record["Name"]
    if name in s3_backends.bucket_accounts:
        return  # the stack's buckets: the deployer made them as the template says
    backend = s3_backends[record["Account"]][PARTITION]
    backend.create_bucket(name, record["Region"])
    if record.get("Versioning"):
        backend.put_bucket_versioning(name, record["Versioning"])
    if record.get("Encryption"):
        backend.put_bucket_encryption(name, record["Encryption"])
    if record.get("Policy"):
        backend.get_bucket(name).policy = record["Policy"].encode()
    if record.get("Tags"):
        backend.put_bucket_tagging(name, record["Tags"])
    report.buckets_created.append(name)


def _restore_object(directory: Path, record: dict[str, Any]) -> str | None:
    """Register one recorded object; the reason it was not, or None."""
    from moto.s3.models import FakeKey

    bodies = [directory / name for name in _body_names(record)]
    if not bodies or any(not b.name.startswith(s3_files.BODY_PREFIX) or b.parent != directory for b in bodies):
        return "the body file name is not one of ours"
    try:
        lengths = [b.stat().st_size for b in bodies]
    except FileNotFoundError:
        return "a body file is missing"
    size = sum(lengths)
    if size != int(record["Size"]):
        return f"the body files have {size} bytes, the record {record['Size']}"
    backend = _backend_for(record["Bucket"])
    if backend is None:
        return "the bucket does not exist"
    bucket = backend.get_bucket(record["Bucket"])
    fields = record.get("Fields") or {}
    key = FakeKey(
        name=record["Key"],
        value=b"",
        account_id=record["Account"],
        region_name=record["Region"],
        storage=fields.get("_storage_class"),
        etag=record["ETag"],
        is_versioned=bool(fields.get("_is_versioned")),
        version_id=fields.get("_version_id"),
        bucket_name=record["Bucket"],
        encryption=fields.get("encryption"),
        kms_key_id=fields.get("kms_key_id"),
        bucket_key_enabled=fields.get("bucket_key_enabled"),
        lock_mode=fields.get("lock_mode"),
        lock_legal_status=fields.get("lock_legal_status"),
        lock_until=fields.get("lock_until"),
        checksum_value=fields.get("checksum_value"),
        checksum_type=fields.get("checksum_type"),
        checksum_parts=fields.get("checksum_parts"),
    )
    key._value_buffer.close()  # the empty body FakeKey made; the recorded file replaces it
    if len(bodies) == 1:
        key._value_buffer = s3_files.ObjectFile.adopt(str(bodies[0]))
    else:
        key._value_buffer = s3_files.PartFiles([str(b) for b in bodies], lengths)
    key.contentsize = size
    key.last_modified = datetime.fromisoformat(record["LastModified"])
    key.checksum_algorithm = fields.get("checksum_algorithm")
    key.website_redirect_location = fields.get("website_redirect_location")
    key.set_metadata(dict(record.get("Metadata") or {}), replace=False)
    bucket.keys.setlist(record["Key"], [key])
    if record.get("Tags"):
        backend.put_object_tagging(key, record["Tags"])
    return None


def _live_bodies() -> set[str]:
    """Body files moto uses now (objects and parts made since this start, e.g. by the deploy)."""
    from moto.s3.models import s3_backends

    names: set[str] = set()
    for account in list(s3_backends.keys()):
        if PARTITION not in s3_backends[account]:
            continue
        backend = s3_backends[account][PARTITION]
        for bucket in list(backend.buckets.values()):
            keys = [k for _, versions in bucket.keys.lists() for k in versions]
            keys += [p for mp in list(bucket.multiparts.values()) for p in mp.parts.values()]
            for key in keys:
                files = s3_files.body_files(getattr(key, "_value_buffer", None))
                names.update(os.path.basename(name) for name in files or [])
    return names


def _body_names(record: dict[str, Any]) -> list[str]:
    """The body files a record names, in order (records before multipart bodies: ``Body`` only)."""
    files = record.get("BodyFiles")
    if isinstance(files, list) and all(isinstance(name, str) for name in files):
        return files
    return [record["Body"]]
