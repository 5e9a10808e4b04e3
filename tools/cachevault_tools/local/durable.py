"""What the embedded AWS keeps across ``local down``/``local up`` and a SIGKILL: S3 and DynamoDB.

Used by the ``cachevault local up`` service (its state dir is the user's, kept between runs):
:func:`install` right after the embedded AWS starts (records are written from then on),
:func:`restore` once the template is deployed (the stack's buckets and tables exist again),
:func:`uninstall` before it stops (moto's reset then closes bodies without removing them).
The layout under ``$CACHEVAULT_HOME`` is in :mod:`cachevault_tools.local.s3_durable`
(``s3/``) and :mod:`cachevault_tools.local.dynamodb_durable` (``dynamodb/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cachevault_tools.local import dynamodb_durable, s3_durable, s3_files


@dataclass
class Restored:
    s3: s3_durable.S3Restored
    dynamodb: dynamodb_durable.DynamoDBRestored

    def summary(self) -> str:
        items = sum(self.dynamodb.items.values())
        line = (
            f"kept from the last run: {self.s3.objects} S3 objects ({self.s3.bytes} bytes), "
            f"{items} DynamoDB items in {len(self.dynamodb.items)} tables"
        )
        if self.s3.buckets_created:
            line += f", buckets {', '.join(self.s3.buckets_created)}"
        dropped = self.s3.dropped_records + self.dynamodb.skipped
        if dropped:
            line += f"; not restored: {'; '.join(dropped)}"
        if self.s3.removed_files:
            line += f"; {self.s3.removed_files} unfinished upload files removed"
        return line


def _s3_dir(state_dir: Path) -> Path:
    return s3_files.root() or state_dir / "s3"


def install(state_dir: Path) -> None:
    s3_durable.install(_s3_dir(state_dir))
    dynamodb_durable.install(state_dir / "dynamodb")


def restore(state_dir: Path) -> Restored:
    return Restored(
        s3=s3_durable.restore(_s3_dir(state_dir)),
        dynamodb=dynamodb_durable.restore(state_dir / "dynamodb"),
    )


def uninstall() -> None:
    s3_durable.uninstall()
    dynamodb_durable.uninstall()
