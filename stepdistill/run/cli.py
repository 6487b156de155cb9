"""A recipe's command line: parse its flags and run it, bad input ending in one ``error:`` line."""

from __future__ import annotations

from collections.abc import Callable

from stepdistill import config as configs
from stepdistill.config import ConfigError
from stepdistill.models.loading import PipelineError
from stepdistill.trainer import DivergedError


def command_line(config_cls: type, main: Callable, prog: str) -> None:
    """A recipe's ``__main__``: parse the flags into ``config_cls``, run ``main``; bad input ends
    with one ``error:`` line (exit status 1) instead of a traceback, and so does a diverged run."""
    cfg = configs.parse(config_cls, prog=prog)
    try:
        main(cfg)
    except (PipelineError, ConfigError, DivergedError) as error:
        raise SystemExit(f"error: {error}") from None
