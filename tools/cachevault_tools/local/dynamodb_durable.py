"""The embedded DynamoDB kept across restarts and crashes: each table as ``$CACHEVAULT_HOME/dynamodb/<table>.json``.

Every mutating call of moto's DynamoDB backend (PutItem, UpdateItem, DeleteItem; BatchWriteItem
and TransactWriteItems go through them; PartiQL statements) rewrites the tables it touched
(tmp + ``os.replace``) before it returns, so before the response leaves: an acknowledged write
survives a SIGKILL. The backend methods are patched, not the HTTP layer: Step Functions
service integrations call the backend directly. Whole-table files rather than a journal: the
tables here hold tens of items (the capture-progress table, written every second by each shard
of a capture, holds one item per shard). Measured here (2 shared cores): a rewrite takes
0.3 ms at 5 items, 1.4 ms at 50, 5.5 ms at 500, against ~1.2 ms for the PutItem itself in
process; a journal would pay off only for caches of hundreds of shards, which one machine
does not run.

:func:`restore` (at start, after the template is deployed: the deployer names tables after the
stack, so the same names come back) puts the items back, TTL attributes and the Powertools
idempotency table included. A file whose table the template no longer has is left alone.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachevault_tools.local.s3_durable import write_atomically

LOG = logging.getLogger(__name__)

_lock = threading.RLock()  # one mutation + its table rewrite at a time: files never go back in time
_depth = threading.local()  # nested backend calls (a transaction's puts) persist once, at the end
_root: Path | None = None
_installed = False


def install(directory: Path) -> None:
    """Persist tables under ``directory`` from now on; patches moto's DynamoDB backend once."""
    global _root, _installed
    directory.mkdir(parents=True, exist_ok=True)
    with _lock:
        _root = directory
        if _installed:
            return
        from moto.dynamodb.models import DynamoDBBackend

        for name, tables in _MUTATIONS.items():
            setattr(DynamoDBBackend, name, _persisting(getattr(DynamoDBBackend, name), tables))
        _installed = True


def uninstall() -> None:
    global _root
    with _lock:
        _root = None


def _table_arg(args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any) -> Iterable[str]:
    name = kwargs.get("table_name", args[0] if args else None)
    return [name] if name else []


def _transaction_tables(args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any) -> Iterable[str]:
    items = kwargs.get("transact_items", args[0] if args else [])
    return {op.get("TableName") for item in items for op in item.values() if isinstance(op, dict)} - {None}


def _all_tables(args: tuple[Any, ...], kwargs: dict[str, Any], backend: Any) -> Iterable[str]:
    return list(backend.tables)


_MUTATIONS: dict[str, Callable[[tuple[Any, ...], dict[str, Any], Any], Iterable[str]]] = {
    "put_item": _table_arg,
    "update_item": _table_arg,
    "delete_item": _table_arg,
    "transact_write_items": _transaction_tables,
    "execute_statement": _all_tables,
    "execute_transaction": _all_tables,
    "batch_execute_statement": _all_tables,
    "delete_table": lambda args, kwargs, backend: [kwargs.get("name", args[0] if args else None)],
}


def _persisting(original: Any, tables_of: Callable[[tuple[Any, ...], dict[str, Any], Any], Iterable[str]]) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _root is None:
            return original(self, *args, **kwargs)
        with _lock:
            depth = getattr(_depth, "value", 0)
            _depth.value = depth + 1
            try:
                return original(self, *args, **kwargs)
            finally:
                _depth.value = depth
                # Also after a failure: a cancelled transaction has put its tables back.
                if depth == 0 and _root is not None:
                    for name in tables_of(args, kwargs, self):
                        if name:
                            persist_table(self, _root, name)

    return method


def persist_table(backend: Any, root: Path, name: str) -> None:
    from moto.dynamodb.models.utilities import dynamo_json_dump

    path = root / f"{name}.json"
    table = backend.tables.get(name)
    if table is None:
        path.unlink(missing_ok=True)
        return
    items = [item.to_json()["Attributes"] for item in table.all_items()]
    # moto's own encoder: binary values as base64 text, as DynamoDB's JSON protocol carries them.
    text = dynamo_json_dump(
        {"TableName": name, "Account": backend.account_id, "Region": backend.region_name, "Items": items}
    )
    write_atomically(path, text)


def _binary_decoded(value: dict[str, Any]) -> dict[str, Any]:
    """An attribute value as moto keeps it once parsed from a request: binary values as bytes."""
    kind, inner = next(iter(value.items()))
    if kind == "B":
        return {kind: base64.b64decode(inner)}
    if kind == "BS":
        return {kind: [base64.b64decode(v) for v in inner]}
    if kind == "M":
        return {kind: {k: _binary_decoded(v) for k, v in inner.items()}}
    if kind == "L":
        return {kind: [_binary_decoded(v) for v in inner]}
    return value


@dataclass
class DynamoDBRestored:
    items: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def restore(directory: Path) -> DynamoDBRestored:
    """Items of every table file under ``directory`` back into the (redeployed) tables of the same name."""
    from moto.dynamodb.models import dynamodb_backends

    report = DynamoDBRestored()
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            backend = dynamodb_backends[data["Account"]][data["Region"]]
            table = backend.tables.get(data["TableName"])
        except (OSError, ValueError, KeyError) as exc:
            report.skipped.append(f"{path.name}: unreadable ({exc})")
            continue
        if table is None:
            report.skipped.append(f"{data['TableName']}: no such table in this deployment")
            continue
        for attrs in data["Items"]:
            # The table's own put: no condition, nothing persisted again.
            table.put_item({name: _binary_decoded(value) for name, value in attrs.items()})
        report.items[data["TableName"]] = len(data["Items"])
    for tmp in directory.glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
    return report
