"""DynamoDB's size of an item, as its 400 KB limit counts it (AWS DynamoDB developer guide,
"Item sizes and formats"): attribute names and values in UTF-8 bytes; a number is about
1 byte per two significant digits plus 1; binary its length; null and boolean 1 byte; a list
or map 3 bytes plus 1 byte per element, plus its elements (a map's keys are names)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

ITEM_LIMIT = 400 * 1024


def _number(value: int | float | Decimal) -> int:
    digits = str(abs(Decimal(str(value)))).replace(".", "").lstrip("0").rstrip("0") or "0"
    return (len(digits) + 1) // 2 + 1


def value_size(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return 1
    if isinstance(value, (int, float, Decimal)):
        return _number(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return 3 + sum(1 + len(str(k).encode()) + value_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 3 + sum(1 + value_size(v) for v in value)
    raise TypeError(f"not a DynamoDB value: {type(value).__name__}")


def item_size(item: dict[str, Any]) -> int:
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())
