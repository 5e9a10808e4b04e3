"""The embedded S3's multipart bodies: part files read as one body, a whole-object CRC-32 from the parts'.

cachevault_tools/local/s3_files.py keeps a completed upload as its part files and combines
the parts' CRC-32s; these check both against the plain answers (bytes joined, crc32 of all).
"""

from __future__ import annotations

import binascii
import os
import random
from pathlib import Path

import pytest
from cachevault_tools.local import s3_files
from cachevault_tools.local.s3_files import FileBody, PartFiles, crc32_combine


def test_crc32_combine_equals_the_crc_of_the_joined_bytes() -> None:
    rng = random.Random(7)
    cases = [(b"", b""), (b"a", b""), (b"", b"b"), (b"hello ", b"world")]
    cases += [(rng.randbytes(rng.randrange(0, 5000)), rng.randbytes(rng.randrange(0, 5000))) for _ in range(200)]
    cases.append((os.urandom(1 << 20), os.urandom((5 << 20) + 3)))
    for a, b in cases:
        got = crc32_combine(binascii.crc32(a), binascii.crc32(b), len(b))
        assert got == binascii.crc32(a + b), (len(a), len(b))


def _parts(tmp_path: Path, sizes: list[int]) -> tuple[list[str], bytes]:
    paths, whole = [], b""
    for number, size in enumerate(sizes):
        data = os.urandom(size)
        path = tmp_path / f"{s3_files.BODY_PREFIX}part{number}"
        path.write_bytes(data)
        paths.append(str(path))
        whole += data
    return paths, whole


def test_file_body_slices_across_part_boundaries(tmp_path: Path) -> None:
    paths, whole = _parts(tmp_path, [1000, 1, 0, 4096, 77])
    body = FileBody([(p, 0, os.path.getsize(p)) for p in paths])
    assert len(body) == len(whole) and body.read_all() == whole
    rng = random.Random(3)
    for _ in range(300):
        start, stop = sorted(rng.randrange(0, len(whole) + 5) for _ in range(2))
        part = body[start:stop]
        assert part.read_all() == whole[start:stop] and len(part) == len(whole[start:stop])
    assert body[-77:].read_all() == whole[-77:]
    assert not body[5:5]
    with pytest.raises(TypeError):
        body[::2]


def test_part_files_read_like_one_file_and_go_with_their_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_files, "_keep_bodies", False)  # a durable environment stopped earlier in this process
    paths, whole = _parts(tmp_path, [300, 200, 500])
    body = PartFiles(paths)
    assert body.read() == whole
    body.seek(250)
    assert body.read(100) == whole[250:350] and body.tell() == 350
    body.seek(-10, os.SEEK_END)
    assert body.read() == whole[-10:] and body.read() == b""
    assert body.segments(len(whole) - 1) == [(paths[0], 0, 300), (paths[1], 0, 200), (paths[2], 0, 499)]
    assert s3_files.body_files(body) == paths and s3_files.body_files(object()) is None
    body.close()  # moto disposing of the key
    assert not any(Path(p).exists() for p in paths)
    with pytest.raises(ValueError):
        PartFiles([])
