"""Optional parts of the package (pyproject extras) and a clear message when one is missing.

The runtime dependencies are what the Lambdas import; the embedded AWS, the benchmarks'
plots and the progress bars come with extras, checked here before a command needs them.
"""

from __future__ import annotations

import importlib.util

from cachevault.core.errors import CacheVaultError

# extra -> the modules it provides (import names), as pyproject.toml's optional-dependencies
EXTRAS = {
    "local": ("moto", "flask", "werkzeug", "yaml"),
    "bench": ("matplotlib",),
    "localstack": ("localstack_client",),
}


class MissingExtra(CacheVaultError):
    code = "MissingDependency"


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise, naming the pip command, when ``extra``'s modules are not installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(
            f"{what} needs the [{extra}] extra (missing: {', '.join(absent)}). Install it with "
            f"`pip install 'cachevault[{extra}]'` (from a checkout: `pip install '.[{extra}]'`, or `make venv`)."
        )
