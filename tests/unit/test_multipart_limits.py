"""S3's 10,000-part limit: the part size follows the predicted size and grows when it was low."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from cachevault.catalog import storage
from cachevault.catalog.storage import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB, PartPlan, S3MultipartWriter
from cachevault.core.errors import InvalidParameterValue
from moto import mock_aws

GiB, TiB = 1 << 30, 1 << 40
BUCKET = "cv-unit-multipart"


def parts_needed(plan: PartPlan, size: int) -> int:
    """How many parts an object of ``size`` bytes takes under ``plan`` (fails past max_parts)."""
    held, number = 0, 0
    while held < size:
        number += 1
        held += plan.size(number)
    return number


def test_fixed_16_mib_parts_stop_at_156_gib() -> None:
    assert MAX_PARTS * 16 * MiB == 156.25 * GiB
    assert PartPlan(None).size(1) == 16 * MiB  # no prediction: the old default to start with


@pytest.mark.parametrize("predicted", [1 * TiB, 3 * TiB, 200 * GiB, 10 * GiB, 0])
def test_the_predicted_size_fits_in_the_planned_parts(predicted: int) -> None:
    plan = PartPlan(predicted)
    assert parts_needed(plan, max(predicted, 1)) <= plan.planned_parts < MAX_PARTS
    assert plan.base >= 16 * MiB and plan.base % MiB == 0


def test_a_1_tib_shard_fits_in_10000_parts() -> None:
    plan = PartPlan(1 * TiB)
    assert parts_needed(plan, 1 * TiB) <= 8_000
    assert plan.base == 132 * MiB  # ceil(1 TiB / 8,000 parts) in whole MiB


@pytest.mark.parametrize(("predicted", "actual"), [(64 * GiB, 1 * TiB), (None, 1 * TiB), (100 * GiB, 1.5 * TiB)])
def test_a_low_prediction_still_fits_because_parts_grow(predicted: int | None, actual: float) -> None:
    plan = PartPlan(predicted)
    assert parts_needed(plan, int(actual)) <= MAX_PARTS
    assert plan.capacity() >= 16 * max(predicted or 0, plan.base * plan.planned_parts)


def test_every_part_size_is_one_s3_accepts() -> None:
    for plan in (PartPlan(None), PartPlan(1 * TiB), PartPlan(4 * TiB), PartPlan(40 * TiB)):
        sizes = [plan.size(n) for n in range(1, MAX_PARTS + 1)]
        assert all(MIN_PART_SIZE <= s <= MAX_PART_SIZE and s % MiB == 0 for s in sizes)
        assert sizes == sorted(sizes)  # never shrinks: parts already sent were the small ones


class PartSizes:
    """The real client, recording the size of every part uploaded."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kwargs: Any) -> Any:
        self.sizes.append(len(kwargs["Body"]))
        return self._client.upload_part(**kwargs)


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_the_writer_grows_its_parts_when_the_object_outgrows_the_prediction(s3: Any) -> None:
    # Scaled down: 4 planned parts of 5 MiB for a 10 MiB prediction, 8 parts at most;
    # the object is 7x the prediction.
    plan = PartPlan(10 * MiB, min_part_size=5 * MiB, max_parts=8, planned_parts=4, growth_every=2)
    data = os.urandom(70 * MiB)
    key = storage.rdb_key("grown", 1)
    client = PartSizes(s3)
    with S3MultipartWriter(client, BUCKET, key, plan=plan, max_in_flight=1) as writer:
        for offset in range(0, len(data), 3 * MiB):
            writer.write(data[offset : offset + 3 * MiB])
        result = writer.close()
    assert result["parts"] <= 8 and result["size"] == len(data)
    assert [size // MiB for size in client.sizes] == [5, 5, 5, 5, 10, 10, 20, 10]  # the last: what was left
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data


def test_the_writer_never_sends_more_parts_than_the_limit(s3: Any) -> None:
    plan = PartPlan(None, min_part_size=5 * MiB, max_parts=3, planned_parts=2, growth_every=1)
    assert plan.capacity() == 20 * MiB
    key = storage.rdb_key("toolarge", 1)
    writer = S3MultipartWriter(s3, BUCKET, key, plan=plan, max_in_flight=1)
    writer.write(os.urandom(21 * MiB))  # three full parts sent, 1 MiB left for a fourth
    with pytest.raises(InvalidParameterValue, match="more than 3 parts"):
        writer.close()
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)
