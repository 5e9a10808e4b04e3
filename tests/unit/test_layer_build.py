"""The local deployer builds a makefile layer as ``sam build`` does (cachevault_tools/local/layer_build.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cachevault_tools.local import layer_build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the build cache lives under ~/.cache
    return tmp_path / "home"


def test_the_product_layer_is_built_with_bytecode_and_reused() -> None:
    layer = ROOT / "layers" / "cachevault"
    built = layer_build.build_layer(layer, "CacheVaultLayer")
    sources = sorted(p.relative_to(layer) for p in (layer / "python").rglob("*.py"))
    assert sorted(p.relative_to(built) for p in (built / "python").rglob("*.py")) == sources
    tag = sys.implementation.cache_tag
    for source in sources:  # every module has its bytecode for this interpreter, unchecked-hash
        pyc = built / source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{pyc}: flags {flags:#b}"  # hash-based, check_source off (PEP 552)
    stamp = (built / ".built").stat().st_mtime_ns
    assert layer_build.build_layer(layer, "CacheVaultLayer") == built
    assert (built / ".built").stat().st_mtime_ns == stamp  # the same content: not built again


def test_a_changed_source_builds_again_and_a_failing_makefile_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "layer"
    (source / "python" / "pkg").mkdir(parents=True)
    (source / "python" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (source / "Makefile").write_text(
        "build-Demo:\n\tmkdir -p \"$(ARTIFACTS_DIR)/python\"\n\tcp -R python/pkg \"$(ARTIFACTS_DIR)/python/\"\n"
    )
    first = layer_build.build_layer(source, "Demo")
    (source / "python" / "pkg" / "__init__.py").write_text("VALUE = 2\n")
    second = layer_build.build_layer(source, "Demo")
    assert first != second and (second / "python" / "pkg" / "__init__.py").read_text() == "VALUE = 2\n"
    with pytest.raises(layer_build.LayerBuildError, match=r"make build-Missing .* failed"):
        layer_build.build_layer(source, "Missing")
    assert sorted(p.name for p in layer_build.cache_root().iterdir()) == sorted([first.name, second.name])
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no make on the machine: said, as sam build would
    (source / "python" / "pkg" / "__init__.py").write_text("VALUE = 3\n")
    with pytest.raises(layer_build.LayerBuildError, match="needs `make`"):
        layer_build.build_layer(source, "Demo")
    assert sorted(p.name for p in layer_build.cache_root().iterdir()) == sorted([first.name, second.name])
