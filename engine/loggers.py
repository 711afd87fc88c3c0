"""Logger helpers for conf/logger/: a W&B logger that never waits for a login, and the end-of-job finish that
makes every Hydra multirun job its own W&B run."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

WANDB_MODES = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "shared": "shared",
    "run": "online",
    "dryrun": "offline",
}  # the last two: wandb's older spellings


def wandb_credentials_found() -> bool:
    """Whether wandb could authenticate without asking: an API key in the environment, an identity-token file,
    or a netrc entry for the W&B host (what `wandb login` writes). Reads files only, never the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``WANDB_MODE``, else online when credentials are found and offline otherwise
    (said once in the log, with how to sync), so a run without a login never stops at a login prompt."""
    chosen = mode or os.environ.get("WANDB_MODE")
    if chosen:
        if chosen.lower() not in WANDB_MODES:
            raise ValueError(
                f"W&B mode {chosen!r}: choose one of online, offline, disabled (logger.wandb.mode or WANDB_MODE)"
            )
        return WANDB_MODES[chosen.lower()]
    if wandb_credentials_found():
        return "online"
    log.warning(
        "W&B: no login found (wandb login / WANDB_API_KEY), logging offline; upload later with "
        "`wandb sync <run folder>/wandb/offline-run-*`, or set WANDB_MODE=disabled to skip W&B"
    )
    return "offline"


def _multirun_job() -> tuple[str, int] | None:
    """(sweep folder name, job number) inside a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return Path(hc.sweep.dir).name, int(hc.job.num)
    except Exception:  # any Hydra without these fields: naming is cosmetic, never worth a failed run
        return None


def wandb_logger(
    project: str,
    name: str | None = None,
    save_dir: str = ".",
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    mode: str | None = None,
    log_model: bool | str = False,
    **kwargs: Any,
) -> WandbLogger:
    """Lightning's WandbLogger with the W&B mode from :func:`wandb_mode` (passed to ``wandb.init`` as ``mode``:
    WandbLogger's own ``offline=True`` would turn ``disabled`` into offline). In a Hydra multirun each job is
    named ``<name>-<job number>`` and, unless ``group`` is given, grouped under its sweep folder's name."""
    mode = wandb_mode(mode)
    job = _multirun_job()
    if job is not None:
        sweep, num = job
        group = group or f"{name or project}-{sweep}"
        name = f"{name}-{num}" if name else None
    logger = WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        entity=entity or None,
        group=group or None,
        tags=list(tags or []),
        log_model=log_model,
        mode=mode,
        **kwargs,
    )
    # Lightning hands wandb.init anonymous=None, which wandb warns "has no effect"; left out, it means the same
    if logger._wandb_init.get("anonymous", "") is None:
        del logger._wandb_init["anonymous"]
    return logger


def finish_loggers(loggers: Iterable[Logger], exit_code: int | None = None) -> None:
    """Finish the W&B run a WandbLogger started (``exit_code`` 1 marks it failed), so the next Hydra multirun job
    in this process starts its own run instead of reusing this one. A no-op without a WandbLogger, when its run
    never started, on ranks other than 0 (they start none), and when called twice. Through wandb's own
    ``wandb.run``/``wandb.finish``: the logger's handle on its run is private."""
    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
