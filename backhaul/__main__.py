"""``python -m backhaul -c config.toml``."""

from backhaul.cli import main

raise SystemExit(main())
