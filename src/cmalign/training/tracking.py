"""Experiment trackers through accelerate's tracker API (tensorboard by default; wandb, trackio and
the rest of accelerate's trackers when their package is installed; none). No tracker package is a
hard dependency: asking for one that is not installed is refused before the run starts."""

from __future__ import annotations

import math

from cmalign.errors import UserError


def trackers(report_to: str) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" -> []."""
    names = [n.strip().lower() for n in str(report_to).split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def check_trackers(report_to: str) -> None:
    from accelerate import utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = trackers(report_to)
    if "none" in names:
        raise UserError(f"report_to: 'none' cannot be combined with trackers, got {report_to!r}")
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"report_to: unknown tracker {name!r}; expected none or any of "
                            f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (comma-separated)")
        available = getattr(utils, f"is_{name}_available", lambda: True)
        if not available():
            raise UserError(f"report_to {name} needs the {name} package, which is not installed (pip install {name})")


def init_run_trackers(accelerator, run_dir, report_to: str, hparams: dict, start_step: int) -> None:
    """Trackers of project "cmalign": tensorboard events under RUN/tensorboard/ (a resumed run continues
    from its step), a W&B run named after the run directory. The accelerator's logging_dir is
    RUN/tensorboard (see trainer). hparams: the run's config as {"section.field": value}."""
    names = trackers(report_to)
    if not names:
        return
    # trackers take flat scalars for hyper-parameters; lists and mappings as text
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    init_kwargs = {"wandb": {"name": run_dir.name}}
    if start_step:
        init_kwargs["tensorboard"] = {"purge_step": start_step + 1}
    accelerator.init_trackers("cmalign", config=hparams, init_kwargs=init_kwargs)


def log_row(accelerator, row: dict, step: int) -> None:
    values = {k: v for k, v in row.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if values and accelerator.trackers:
        accelerator.log(values, step=step)


def log_image(accelerator, tag: str, image, step: int) -> None:
    """A picture (PIL) to every tracker that takes images: TensorBoard's writer.add_image, the others' log_images
    (W&B, trackio, ... as accelerate wraps them); trackers without images are skipped."""
    import numpy as np

    array = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, array, step, dataformats="HWC")
            tracker.writer.flush()
        elif callable(getattr(tracker, "log_images", None)):
            tracker.log_images({tag: [image]}, step=step)
