"""A recipe's command line: parse its flags and run it, bad input ending in one ``error:`` line.

The library raises domain errors (unreadable data, a damaged checkpoint, a full disk, a diverged run);
this is where they are worded as the flags that change them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from stepdistill import config as configs
from stepdistill.assets import recipe_presets
from stepdistill.checkpoints import CheckpointError, DiskSpaceError
from stepdistill.config import ConfigError
from stepdistill.data.prompts import DataError
from stepdistill.models.loading import PipelineError
from stepdistill.trainer import DivergedError, Interrupted

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a Ctrl-C


def command_line(config_cls: type, main: Callable, prog: str) -> None:
    """A recipe's ``__main__``: parse the flags into ``config_cls``, run ``main``; bad input ends
    with one ``error:`` line instead of a traceback (exit status 2 from the flags' own checks, 1 from
    what the run meets later), and so does a diverged run. Ctrl-C ends with a line saying how to
    resume (exit status 130)."""
    recipe = Path(prog).stem
    cfg = configs.parse(config_cls, prog=prog, presets=recipe_presets(recipe))
    try:
        main(cfg)
    except (PipelineError, ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    except DivergedError as error:
        raise SystemExit(f"error: {error}. Lower --learning_rate or --max_grad_norm and resume with "
                         "--resume_from_checkpoint latest") from None
    except DiskSpaceError as error:
        raise SystemExit(f"error: --output_dir {error}; free space, choose another disk, or set "
                         "--checkpointing_steps 0") from None
    except CheckpointError as error:
        raise SystemExit(f"error: --resume_from_checkpoint: {error}") from None
    except Interrupted as stop:
        if stop.is_main_process:
            print(f"{stop}; " + (f"{stop.checkpoint} written: resume with --resume_from_checkpoint latest"
                                 if stop.checkpoint else "nothing saved (--checkpointing_steps 0)"), file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # one line for a multi-process run
            print("interrupted (a run stopped while training resumes from its newest checkpoint, if it wrote any, "
                  "with --resume_from_checkpoint latest)", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
