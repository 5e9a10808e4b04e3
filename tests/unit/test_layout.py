"""The SAM layout stays deployable: the dependencies layer installs exactly the pinned runtime."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return sorted(line for line in lines if line)


def test_dependencies_layer_pins_the_same_runtime_packages() -> None:
    # sam build installs layers/dependencies/requirements.txt into the layer; the venv and CI
    # install requirements.txt: a drift would ship different packages than were tested.
    assert _requirements(ROOT / "layers/dependencies/requirements.txt") == _requirements(ROOT / "requirements.txt")


def test_every_function_is_a_thin_handler_module() -> None:
    apps = sorted((ROOT / "functions").glob("*/app.py"))
    assert len(apps) >= 20
    for app in apps:
        text = app.read_text()
        assert "lambda_handler" in text, app
        assert len(text.splitlines()) <= 40, f"{app} is not thin: domain code belongs in the layer"
