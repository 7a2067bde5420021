"""Where peft-routing keeps what it builds once per machine (converted models, aligned vision weights, benchmark
runs): ``~/.cache/peft-routing``, or ``$PEFT_ROUTING_CACHE``. Never inside the repository."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PEFT_ROUTING_CACHE"


def cache_root() -> Path:
    """The cache folder (not created here; writers create what they stage into it)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "peft-routing"
