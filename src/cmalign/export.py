"""`cmalign export`: a finished run's LoRA in the format another tool loads, written only once it has been
checked to load whole into that tool's own loader (docs/export.md); and the extra formats a run writes into
adapter/ at its end (`lcm.export_formats`, `--export-formats diffusers,kohya`).

Formats (lcm world, per family: worlds/lcm/lora.py EXPORT_FORMATS):
- diffusers: pytorch_lora_weights.safetensors, for `pipe.load_lora_weights` (checked with the stock pipeline's
  loader into a weightless UNet);
- peft: a folder (adapter_model.safetensors in PeftModel's key names + adapter_config.json), for
  `PeftModel.from_pretrained` (checked that way into a weightless network);
- kohya: one .safetensors in sd-scripts' names, for ComfyUI / A1111 / sd-scripts and diffusers' kohya path
  (worlds/lcm/kohya.py: checked through diffusers' own kohya loader).
The digits world's adapter and a full fine-tune's network have no LoRA formats: refused in one line.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmalign.errors import UserError
from cmalign.training.run_dir import ensure_writable_dir, ensure_writable_file, writing

FORMATS = ("diffusers", "peft", "kohya")
ALWAYS_WRITTEN = ("diffusers", "peft")  # an sd / sdxl run's adapter/ holds these anyway (pixart: peft)
LORA_WORLDS = "the lcm world's SD-1.5- and SDXL-class models (diffusers, peft, kohya) and PixArt-LCM (peft)"


@dataclass
class ExportArgs:
    run: str
    """Finished run directory (config.yaml and adapter/)."""
    format: Literal["diffusers", "peft", "kohya"]
    """diffusers: pytorch_lora_weights.safetensors (load_lora_weights); peft: an adapter folder
    (PeftModel.from_pretrained); kohya: one .safetensors (ComfyUI LoraLoader, A1111 <lora:name:1>, sd-scripts)."""
    out: str | None = None
    """File (diffusers, kohya) or folder (peft) to write; default RUN/export/<pytorch_lora_weights.safetensors |
    peft/ | lora_kohya.safetensors>."""
    overwrite: bool = False
    """Replace an existing output file (peft: the adapter files in the folder)."""


# --- which formats a run can export ---------------------------------------------------------------------
def _family(cfg) -> str:
    from cmalign.worlds.lcm.family import model_family, optional_ref

    return model_family(cfg.lcm.model, optional_ref(cfg.lcm.unet))  # configs only, no weights


def formats_of_run(cfg) -> tuple[str, ...]:
    """The LoRA formats a run's adapter exports to, read from its config (no weights load)."""
    from cmalign.worlds.lcm.lora import EXPORT_FORMATS

    if cfg.world != "lcm" or cfg.finetune == "full":
        return ()
    return EXPORT_FORMATS[_family(cfg)]


def _refusal(cfg, fmt: str, formats: tuple[str, ...]) -> UserError:
    if cfg.finetune == "full":
        return UserError(f"cannot export {fmt}: this run fine-tuned the whole network (finetune full), so adapter/ "
                         "holds a diffusers model folder (load it with from_pretrained), not a LoRA")
    if not formats:
        return UserError(f"cannot export {fmt}: the {cfg.world} world's adapter (adapter/) is in its own format only; "
                         f"LoRA formats exist for {LORA_WORLDS}")
    return UserError(f"cannot export {fmt}: this run's model family exports as {', '.join(formats)} only "
                     "(diffusers has no PixArt LoRA loader, and kohya's format has no PixArt layout)")


# --- the command -----------------------------------------------------------------------------------------
def read_finished_run(run: Path):
    """The config of a finished run directory (config.yaml and adapter/), refused in one line otherwise."""
    from cmalign.config import load_preset

    if not run.is_dir() or not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    if not (run / "adapter").is_dir():
        raise UserError(f"{run} holds no finished adapter (adapter/ is missing): the run did not finish")
    return load_preset(str(run / "config.yaml"))


def default_out(run: Path, fmt: str) -> Path:
    from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, KOHYA_FILE

    return run / "export" / {"diffusers": DIFFUSERS_LORA_FILE, "peft": "peft", "kohya": KOHYA_FILE}[fmt]


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse (one line, nothing written) an output the format cannot go to."""
    from cmalign.worlds.lcm.lora import PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE

    if fmt == "peft":
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; the peft format is a folder")
        taken = [n for n in (PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE) if (out / n).exists()]
        if taken and not overwrite:
            raise UserError(f"--out {out} already holds {taken[0]}; pass --overwrite to replace it")
        ensure_writable_dir(out, "--out folder")
        return
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must name a .safetensors file for the {fmt} format")
    if out.exists() and not out.is_dir() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    ensure_writable_file(out, "--out file")


def export_run(run, fmt: str, out=None, overwrite: bool = False) -> Path:
    """Write a finished run's LoRA in `fmt` at `out` (default under RUN/export/), checked to load whole first."""
    from cmalign.training.build import build_world
    from cmalign.config import with_changes

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    run = Path(run)
    cfg = read_finished_run(run)
    formats = formats_of_run(cfg)
    if fmt not in formats:
        raise _refusal(cfg, fmt, formats)
    out = Path(out) if out else default_out(run, fmt)
    check_out(out, fmt, overwrite)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one line of output per command
    world = build_world(with_changes(cfg, device="cpu"), "cpu", lora=True)
    world.load_adapter(run / "adapter")
    with writing(f"the {fmt} export", out):
        return write_format(world, fmt, run / "adapter", out)


# --- writers (lcm world; each checks before the file appears) --------------------------------------------
def write_format(world, fmt: str, adapter_dir: Path, out: Path) -> Path:
    """`fmt` of the world's loaded adapter (also in adapter_dir, as the run wrote it) at `out`."""
    from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE

    source = Path(adapter_dir) / DIFFUSERS_LORA_FILE
    if fmt != "peft" and not source.is_file():
        raise UserError(f"{adapter_dir} holds no {DIFFUSERS_LORA_FILE} to export {fmt} from")
    if fmt == "diffusers":
        return _write_diffusers(world, source, out)
    if fmt == "peft":
        return _write_peft(world, out)
    from cmalign.worlds.lcm.kohya import export_kohya

    return export_kohya(source, out, world.pipeline)


def _write_diffusers(world, source: Path, out: Path) -> Path:
    from cmalign.worlds.lcm.lora import OUR_ADAPTER, check_lora_loads_completely

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.safetensors")
    shutil.copyfile(source, partial)
    try:
        check_lora_loads_completely(type(world.pipeline), world.network, OUR_ADAPTER, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return out


def _write_peft(world, out: Path) -> Path:
    """adapter_model.safetensors (PeftModel's key names) + adapter_config.json, checked in a temporary folder
    and then moved into `out` (other files there stay)."""
    from safetensors.torch import save_file

    from cmalign.worlds.lcm.lora import (
        OUR_ADAPTER, PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE, PEFT_PREFIX, check_peft_adapter_loads_completely,
    )

    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".peft.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        weights = {PEFT_PREFIX + k.removeprefix(PEFT_PREFIX): v.detach().float().contiguous().cpu()
                   for k, v in world.adapter_state_dict().items()}
        save_file(weights, partial / PEFT_ADAPTER_FILE)
        world.adapter_config().save_pretrained(str(partial))
        check_peft_adapter_loads_completely(world.network, OUR_ADAPTER, partial)
        for name in (PEFT_CONFIG_FILE, PEFT_ADAPTER_FILE):
            os.replace(partial / name, out / name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


# --- at the end of a run (the trainer's hooks) -----------------------------------------------------------
def requested_formats(world, cfg) -> list[str]:
    """The export_formats of the world's own config sections (the lcm world: lcm.export_formats)."""
    asked: list[str] = []
    for name in dict(getattr(type(world), "config_sections", None) or {}):
        section = cfg.sections.get(name)
        asked += [f for f in (getattr(section, "export_formats", None) or []) if f not in asked]
    return asked


def check_run_formats(world, cfg) -> None:
    """Before training: refuse (one line) export formats this world cannot write."""
    asked = requested_formats(world, cfg)
    if not asked:
        return
    from cmalign.worlds.lcm.lora import EXPORT_FORMATS

    family = getattr(world, "family", None) if world.name == "lcm" and cfg.finetune != "full" else None
    formats = EXPORT_FORMATS.get(family, ())
    bad = [f for f in asked if f not in formats]
    if bad:
        raise UserError(str(_refusal(cfg, bad[0], formats)).replace("cannot export", "export_formats: cannot write", 1))


def write_run_formats(world, directory: Path, cfg) -> list[Path]:
    """At the end of a run, into its adapter folder: the asked formats that save_adapter did not write
    (kohya -> lora_kohya.safetensors beside pytorch_lora_weights.safetensors)."""
    from cmalign.worlds.lcm.lora import KOHYA_FILE

    directory = Path(directory)
    return [write_format(world, fmt, directory, directory / KOHYA_FILE)
            for fmt in requested_formats(world, cfg) if fmt not in ALWAYS_WRITTEN]
