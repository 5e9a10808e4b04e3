"""``python -m cachevault.cli``."""

from cachevault.cli import main

raise SystemExit(main())
