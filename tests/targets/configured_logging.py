"""A target module that configures logging itself: the runner must not add a handler."""

from __future__ import annotations

import logging
import sys

from targets.nodes import Basic

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("CUSTOM %(name)s %(message)s"))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)

Node = Basic
