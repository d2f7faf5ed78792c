"""``python -m gfmfr_secure``: the same command line as ``gfmfr-secure``."""

from gfmfr_secure.cli import main

raise SystemExit(main())
