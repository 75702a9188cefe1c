"""``python -m dig_service``: see ``python -m dig_service run --help``."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
