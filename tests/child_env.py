"""The environment for a trainer started as a child process of the tests (shared by the end-to-end tests)."""

from __future__ import annotations

import os

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) without the one-process group variables that an in-process
    run set (a child would try to join that group's port), plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in DIST_VARS}
    return {**env, **extra}
