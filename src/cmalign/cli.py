"""Command line: cmalign train | sample | eval | export | pretrain | reward-model | experiment.

Bad input ends with one line `cmalign: error: ...` and exit code 2, never a traceback.
Each command imports what it runs inside its handler, so that `cmalign --help` and a refusal of bad
flags never pay for torch, diffusers or transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass

import tyro

from cmalign.config.train import DeprecatedName
from cmalign.errors import UserError
from cmalign.training.run_dir import Preempted

COMMANDS = {
    "train": "fine-tune a consistency model (default: ROCM, KL, digits world)",
    "sample": "generate PNGs and samples.npz from a run directory or the base model",
    "eval": "compare the base model and runs on prompt sets: every reward at every K, intervals, paired deltas, report.html",
    "export": "write a finished run's LoRA as diffusers, peft or kohya (ComfyUI / A1111) files (docs/export.md)",
    "pretrain": "train the digits world's base models into the cache (cmalign pretrain digits)",
    "reward-model": "train a Bradley–Terry reward model (cmalign reward-model train)",
    "experiment": "run one of the paper's analyses (cmalign experiment NAME [--quick] [--out DIR])",
}


def _one_line_tyro_error(text: str) -> str:
    """tyro prints a boxed (or, without a terminal, dashed) multi-line message: keep the first paragraph
    after its title as one line, without the "For full helptext" hint."""
    paragraphs, current = [], []
    for raw in text.splitlines():
        line = raw.strip().strip("│╭╮╰╯").strip()
        if raw.strip().startswith(("╭", "╰")):
            continue
        if not line or set(line) <= set("─- "):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    paragraphs = [p for p in paragraphs if not p.startswith("For full helptext")]
    if "╭" not in text and len(paragraphs) > 1:  # the dashed form starts with a title ("Value error")
        paragraphs = paragraphs[1:]
    return re.sub(r"\s+", " ", paragraphs[0]) if paragraphs else "invalid arguments"


def parse(cls, args: list[str], prog: str, default=None):
    """tyro parsing with tyro's help on --help and a one-line error otherwise."""
    if any(a in ("-h", "--help") for a in args):
        return tyro.cli(cls, args=args, prog=prog, default=default) if default is not None else tyro.cli(cls, args=args, prog=prog)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(buffer):
            kwargs = {"default": default} if default is not None else {}
            return tyro.cli(cls, args=args, prog=prog, **kwargs)
    except SystemExit as exc:
        if exc.code:
            raise UserError(_one_line_tyro_error(buffer.getvalue())) from None
        raise


# --- train -----------------------------------------------------------------------------------------
def _named(args: list[str], flag: str) -> str | None:
    """The value of --flag VALUE / --flag=VALUE in a command line (the last one wins, as in parsing)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _split_train_args(args: list[str]):
    """(preset, config_file, overwrite, resume, the rest) of a `cmalign train` command line."""
    preset, config_file, overwrite, resume, rest = None, None, False, None, []
    it = iter(args)
    for a in it:
        key, eq, inline = a.partition("=")
        if key == "--export-formats":  # the lcm world's setting (cmalign/export.py), by its short name
            rest.append("--lcm.export-formats" + (eq + inline if eq else ""))
        elif key in ("--preset", "--config"):
            value = inline if eq else next(it, None)
            if not value:
                raise UserError(f"{key} needs a value")
            preset, config_file = (value, config_file) if key == "--preset" else (preset, value)
        elif a == "--overwrite":
            overwrite = True
        elif key == "--resume":
            resume = inline if eq else next(it, None)
            if not resume:
                raise UserError("--resume needs a value: latest or a checkpoint directory")
        else:
            rest.append(a)
    return preset, config_file, overwrite, resume, rest


def _train_flags(base):
    """A dataclass of TrainConfig's common fields and one nested dataclass per section (`--lcm.model`), as tyro
    parses it, and its instance holding base's values."""
    from cmalign.config.train import TrainConfig, common_field_names

    flags = dataclasses.make_dataclass(
        "TrainFlags", [(name, type(s), dataclasses.field(default_factory=type(s))) for name, s in base.sections.items()],
        bases=(TrainConfig,))
    default = flags(**{k: getattr(base, k) for k in common_field_names()}, sections={}, **base.sections)
    return flags, default


def _parse_train(preset, config_file, rest: list[str], base):
    """base < preset < config file < flags, as one TrainConfig."""
    from cmalign.config.io import add_owner_sections, load_preset
    from cmalign.config.train import TrainConfig, common_field_names

    if preset:
        base = load_preset(preset, base)
    if config_file:
        base = load_preset(config_file, base)
    # the sections of a plug-in world or method named on the command line become flags
    add_owner_sections(_named(rest, "--world") or base.world, _named(rest, "--method") or base.method)
    base = TrainConfig(**{k: getattr(base, k) for k in common_field_names()}, sections=base.sections)
    flags, default = _train_flags(base)
    parsed = parse(flags, rest, "cmalign train [--preset NAME] [--config FILE] [--overwrite] [--resume latest|PATH]",
                   default=default)
    return TrainConfig(**{k: getattr(parsed, k) for k in common_field_names()},
                       sections={name: getattr(parsed, name) for name in base.sections})


def train_arguments(args: list[str]):
    """(config, overwrite, resume) of a `cmalign train` command line, parsed but not run.
    Precedence: defaults < the world's defaults for its model (World.default_settings: e.g. an lcm family's
    guidance, batch and dtype) < preset < config file < flags."""
    from cmalign.config.io import cli_aliases
    from cmalign.config.train import TrainConfig, with_changes
    from cmalign.worlds.registry import WORLDS

    preset, config_file, overwrite, resume, rest = _split_train_args(args)
    rest = cli_aliases(rest)
    cfg = _parse_train(preset, config_file, rest, TrainConfig())
    world_defaults = WORLDS.get_class(cfg.world).default_settings(cfg) if cfg.world in WORLDS else {}
    if world_defaults:  # parse again on top of them, so that what the user set wins
        cfg = _parse_train(preset, config_file, rest, with_changes(TrainConfig(), **world_defaults))
    return cfg, overwrite, resume


def _check_export_formats_flag(args: list[str], cfg) -> None:
    """--export-formats names LoRA formats of the lcm world: refused for another world rather than ignored."""
    if cfg.world != "lcm" and any(a.partition("=")[0] == "--export-formats" for a in args):
        raise UserError(f"--export-formats: the {cfg.world} world writes its adapter in its own format only; "
                        "diffusers, peft and kohya exports exist for the lcm world (docs/export.md)")


def cmd_dry_run(cfg, overwrite: bool, resume: str | None) -> int:
    """--dry-run: build everything, run one training step, print its seconds and the peak memory; write nothing."""
    from cmalign.training import cost
    from cmalign.training.trainer import Trainer

    if resume is not None:
        raise UserError("--dry-run measures a fresh training step; drop --resume")
    trainer = Trainer(cfg, overwrite=overwrite, progress=False, dry_run=True)
    result = cost.dry_run(trainer)
    if os.environ.get("RANK", "0") == "0":
        per = trainer.accelerator.num_processes
        print(f"cmalign: dry run, nothing written: 1 training step of {cfg.method} on {cfg.world} (batch {cfg.batch_size} "
              f"x {per} process(es), K={trainer.num_steps}) took {result['seconds_per_step']:.3g} s (warm-up included); "
              f"peak memory {result['peak_memory_bytes'] / 2**20:.1f} MiB ({result['peak_memory_of']})")
    return 0


def cmd_train(args: list[str]) -> int:
    from cmalign.training.trainer import train

    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    cfg, overwrite, resume = train_arguments(args)
    _check_export_formats_flag(args, cfg)
    if dry:
        return cmd_dry_run(cfg, overwrite, resume)
    run_dir = train(cfg, overwrite=overwrite, resume=resume).run_dir
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun: the main process only
        print(f"cmalign: done. Results in {run_dir}/ (report.md, metrics.jsonl, grids/, adapter/, tensorboard/)")
    return 0


# --- sample and eval (evaluate_cmd.py) --------------------------------------------------------------
def cmd_sample(args: list[str]) -> int:
    from cmalign.evaluate_cmd import cmd_sample as sample

    return sample(args, parse)


def cmd_eval(args: list[str]) -> int:
    from cmalign.evaluate_cmd import cmd_eval as evaluate

    return evaluate(args, parse, train_arguments)


# --- export -----------------------------------------------------------------------------------------
def cmd_export(args: list[str]) -> int:
    from cmalign.export import ExportArgs, export_run

    a = parse(ExportArgs, args, "cmalign export")
    out = export_run(a.run, a.format, a.out, overwrite=a.overwrite)
    print(f"cmalign: wrote the {a.format} LoRA of {a.run} to {out} (checked to load whole; docs/export.md)")
    return 0


# --- experiments -------------------------------------------------------------------------------------
@dataclass
class ExperimentArgs:
    quick: bool = False
    """Tiny test models and two steps per run (seconds; the numbers mean nothing)."""
    out: str | None = None
    """Results folder (default results/NAME[-quick])."""
    threads: int | None = None
    """torch threads per run (default: 1 where runs train in parallel, else every core)."""
    steps: int | None = None
    """Training steps per run (default: the experiment's own budget)."""
    seeds: int | None = None
    """Seeds per setting where the experiment repeats runs (default: the experiment's own)."""
    jobs: int | None = None
    """Runs trained at once in worker processes, where an experiment's runs are independent (default: cores // threads)."""
    overwrite: bool = False
    """Write into an --out folder that holds other files (files of the same names are replaced)."""


def cmd_experiment(args: list[str]) -> int:
    from cmalign.experiments import EXPERIMENTS, run_experiment

    listing = "\n".join(f"  {k:<16} {v}" for k, v in EXPERIMENTS.items())
    if not args or args[0] in ("-h", "--help"):
        print("usage: cmalign experiment NAME [--quick] [--out DIR] [--threads N] [--jobs N] [--steps N] [--seeds N]\n\n" + listing)
        return 0
    a = parse(ExperimentArgs, args[1:], f"cmalign experiment {args[0]}")
    for flag, value in (("threads", a.threads), ("jobs", a.jobs), ("steps", a.steps), ("seeds", a.seeds)):
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be a positive integer, got {value}")
    report = run_experiment(args[0], a.out, quick=a.quick, threads=a.threads, steps=a.steps, seeds=a.seeds, jobs=a.jobs,
                            overwrite=a.overwrite)
    print(f"cmalign: experiment {args[0]} -> {report}")
    return 0


HANDLERS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export, "experiment": cmd_experiment}
# Commands of one world live beside it ("module:function", imported when run, so that `cmalign --help` stays light).
WORLD_COMMANDS = {"pretrain": "cmalign.worlds.digits.cli:pretrain", "reward-model": "cmalign.worlds.digits.cli:reward_model"}


def handler(command: str):
    """The function that runs `command` (a world command is imported here)."""
    if command in WORLD_COMMANDS:
        module, _, name = WORLD_COMMANDS[command].partition(":")
        return getattr(importlib.import_module(module), name)
    return HANDLERS[command]


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: cmalign [--debug] COMMAND [options]   (cmalign COMMAND --help; --debug: a plug-in's own traceback)\n\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()
    )


def _quiet_libraries() -> None:
    """One line per refusal: the libraries' own notices (torchvision fallbacks, hub deprecations) are not the
    user's concern, and cmalign's own warnings (deprecated flags) print as `cmalign: warning: ...`."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=DeprecatedName)
    warnings.showwarning = lambda message, category, *args, **kwargs: print(f"cmalign: warning: {message}", file=sys.stderr)


def _report_user_error(exc: UserError, debug: bool) -> int:
    """One `cmalign: error:` line; under --debug, first the traceback of the plug-in's own exception."""
    if debug and exc.__cause__ is not None:
        import traceback

        traceback.print_exception(exc.__cause__, file=sys.stderr)
    print(f"cmalign: error: {exc}" + (" (rerun with --debug for its traceback)" if _is_plugin_error(exc) and not debug else ""),
          file=sys.stderr)
    return 2


def _is_plugin_error(exc: BaseException) -> bool:
    from cmalign.plugins import PluginError

    return isinstance(exc, PluginError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # the traceback of an exception raised inside a plug-in's code, before its one line
    argv = [a for a in argv if a != "--debug"]
    _quiet_libraries()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS and command not in WORLD_COMMANDS:
        print(f"cmalign: error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return handler(command)(rest)
    except UserError as exc:
        return _report_user_error(exc, debug)
    except Preempted as exc:  # SIGTERM/SIGINT: the current step is checkpointed
        print(exc.cli_message(argv), file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cmalign: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cmalign: error: out of memory: lower batch_size / eval_size / final_eval_size (or the resolution)", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch's allocators (CPU and CUDA) raise RuntimeError subclasses
        text = str(exc)
        if "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text:
            print(f"cmalign: error: out of memory ({text.splitlines()[0][:160]}): lower batch_size / eval_size / "
                  "final_eval_size (or the resolution)", file=sys.stderr)
            return 2
        raise
    except BrokenPipeError:  # the reader went away (`cmalign ... --help | head`): nothing left to say
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
