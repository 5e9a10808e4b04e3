"""``python -m cachevault_tools.cli``."""

from cachevault_tools.cli import main

raise SystemExit(main())
