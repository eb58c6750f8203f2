"""Scaling: how ROCM's speed advantage over RLCM changes with the problem's size, under the comparison protocol
(experiments/protocol.py) at every setting. At each setting (resolution, K, digits grid N) ROCM and RLCM are each run
over their tuning grid (lr x ROCM beta / RLCM PPO clip, 4 cells each) with the same samples and no wall-clock cap;
each picks its cell of best final validation gold, and the setting reports the test gold of both, ROCM's gap to RLCM
and ROCM's speed ratios, each with a 95% interval: ratio_s_to_target, ROCM's train seconds to RLCM's own best
validation gold over RLCM's seconds to it (seed by seed), beside the ratios of seconds per step and of train seconds.

Over resolution and K (`cmalign experiment scaling`): 8x8 at K = 2, 4, 8 and 16x16 at K = 4. The paper's speed claim
concerns 16k-dimensional latents; here the action is 64 or 256 pixels per step, so the question is only whether the
ratio falls as d grows. The 16x16 base model ships with the package (float16; `cmalign pretrain digits --resolution
16 --teacher-steps 1500 --distill-steps 600` rebuilds it, 37 min on one core); the first 16x16 run builds that
resolution's proxy (2,000 gold pairs, about a minute).

Over intrinsic dimension (`cmalign experiment scaling-grid`, run_grid below): upsampling keeps 64 degrees of freedom,
so the honest axis is the compositional digits grid (worlds/digits_grid.py): N x N independent 8x8 digits, 64 N²
dimensions, N = 1, 2, 3 at K = 2. Beside the ratios above it reports ratio_s_to_target_within_kl: ROCM must reach
RLCM's best gold at no larger KL to the base model than RLCM had there (the KL every method is measured by alike).

Default size: 50 steps x batch 32 a run (compute-matched's), validation on 100 fixed chains every 5 steps (the time
to a target is read from those points), 500 test chains at the end, two runs at a time. scaling-grid: 3 settings x 8
cells = 24 runs, about 20 minutes a seed on 2 cores (60 min for three, 2026-12-07, `results/scaling-grid/`); scaling:
4 x 8 = 32 runs, about 27 minutes a seed (81 min for three, 2026-12-08, `results/scaling/`), most of it the 16x16 and
K = 8 runs."""

from __future__ import annotations

from pathlib import Path

from cmalign.experiments.common import plot_bands, seed_band, seeded_train_runs, write_report, write_table
from cmalign.experiments.protocol import (METHOD_ARMS, RESAMPLES, collect_runs, grid_cells, interval_text, ordered,
                                          protocol_intervals, selected_keys, selected_table, target_ratio_intervals, trace_rows)

SETTINGS = ((8, 2, 1), (8, 4, 1), (8, 8, 1), (16, 4, 1))  # (resolution, K, grid N)
QUICK_SETTINGS = ((8, 2, 1), (16, 2, 1))
# (resolution, K, grid N): 64, 256, 576 dimensions. K = 2 (one stochastic step and the final one): a 3x3 grid step
# costs several 8x8 steps, and the axis here is N, not K
GRID_SETTINGS = ((8, 2, 1), (8, 2, 2), (8, 2, 3))
QUICK_GRID_SETTINGS = ((8, 2, 1), (8, 2, 2))
ARMS = ("rocm", "rlcm")
STEPS = 50
VALIDATION = {"eval_every": 5, "eval_size": 100}
PRETRAIN_16 = {"digits.pretrain_teacher_steps": 1500, "digits.pretrain_distill_steps": 600}
QUICK_GRID = {"digits.pretrain_teacher_steps": 20, "digits.pretrain_distill_steps": 10, "digits.proxy_pairs": 80}  # the tiny grid models


def setting_name(res: int, k: int, grid: int) -> str:
    return f"r{res}-k{k}" if grid == 1 else f"grid{grid}-k{k}"


def setting_columns(res: int, k: int, grid: int) -> dict:
    """The columns that say which setting a row belongs to; action_dim: pixels per step of the chain."""
    return {"setting": setting_name(res, k, grid), "resolution": res, "K": k, "grid": grid, "action_dim": (res * grid) ** 2}


def setting_overrides(quick: bool, res: int, k: int, grid: int) -> dict:
    """make_config overrides of a setting: its resolution, chain length and world, and the validation schedule."""
    extra = {"num_steps": k, "digits.resolution": res, **({} if quick else VALIDATION)}
    if grid > 1:
        extra.update({"digits.grid": grid, **(QUICK_GRID if quick else {})})
    elif not quick and res != 8:
        extra.update(PRETRAIN_16)
    return extra


def setting_cells(out: Path, quick: bool, threads: int, steps: int, settings) -> dict:
    """(setting, arm, cell name) -> (config, run directory out/runs/SETTING-CELL) for every arm's grid at every setting."""
    cells = {}
    for res, k, grid in settings:
        name = setting_name(res, k, grid)
        arms = {arm: METHOD_ARMS[arm] for arm in ARMS}
        for (arm, cell), (cfg, run_dir) in grid_cells(arms, out, quick, threads, steps, **setting_overrides(quick, res, k, grid)).items():
            cells[(name, arm, cell)] = (cfg, run_dir.with_name(f"{name}-{run_dir.name}"))
    return cells


def compare_setting(setting: tuple, cells: dict, seeded: dict, within_kl: bool) -> tuple[list[dict], list[dict], list[dict], dict]:
    """One setting's summary rows, its intervals (test metrics, ROCM's gaps and speed ratios to RLCM), its validation
    trace and arm -> its selected cell's key, each row with the setting's columns first."""
    name, columns = setting_name(*setting), setting_columns(*setting)
    mine = {key[1:]: value for key, value in cells.items() if key[0] == name}
    runs = {key[1:]: value for key, value in seeded.items() if key[0] == name}
    rows, chains, keys = collect_runs(mine, runs)
    intervals, selected = protocol_intervals(rows, chains, reference="rocm")
    chosen = selected_keys(selected, keys)
    intervals += target_ratio_intervals(runs, chosen, "rocm")
    if within_kl:
        intervals += target_ratio_intervals(runs, chosen, "rocm", within_kl=True)
    tag = lambda table: [{**columns, **r} for r in table]  # noqa: E731
    return tag(rows), tag(intervals), tag(trace_rows(runs)), {arm: (name, *key) for arm, key in chosen.items()}


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
        settings=None, name: str = "scaling") -> Path:
    steps = steps or (2 if quick else STEPS)
    settings = settings or (QUICK_SETTINGS if quick else SETTINGS)
    within_kl = any(grid > 1 for _, _, grid in settings)
    cells = setting_cells(out, quick, threads, steps, settings)
    seeded = seeded_train_runs(cells, seeds, jobs)
    rows, intervals, trace, chosen, selected = [], [], [], {}, []
    for setting in settings:
        r, i, t, c = compare_setting(setting, cells, seeded, within_kl)
        rows, intervals, trace = rows + r, intervals + i, trace + t
        chosen.update({f"{arm} {setting_name(*setting)}": key for arm, key in c.items()})
        selected += [{**setting_columns(*setting), **s} for s in selected_table(r, i)]
    axis = "intrinsic dimension (digits grid N x N)" if within_kl else "resolution and K"
    parts = [write_table(out, "ratios", ratio_table(intervals), f"ROCM / RLCM speed ratios over {axis} (selected cells)", [
                 "estimate [95% interval]; ratio_s_to_target: ROCM's train seconds to RLCM's own best validation gold over "
                 "RLCM's seconds to it, seed by seed (inf: ROCM never got there in some seed)"
                 + ("; within_kl: at no larger KL to the base model than RLCM's there" if within_kl else ""),
                 f"hierarchical bootstrap, {RESAMPLES} resamples; rocm: KL divergence, one update per step; rlcm: PPO, "
                 "ppo.epochs x ppo.minibatches updates per step"])[0],
             write_table(out, "selected", selected, "Each method's cell of best validation gold at each setting, scored on the test chains")[0],
             write_table(out, "intervals", intervals, "Reported quantities with 95% intervals, setting by setting")[0],
             write_table(out, "summary", ordered_by_setting(rows), f"ROCM vs RLCM over {axis}: {steps} steps x batch, lr x knob, "
                         f"{seeds} seed(s)", ["a row per run; selected = 1: its method's cell of best validation gold at its setting"])[0]]
    t_trace, _ = write_table(out, "trace", trace, "Validation gold over training (every run)")
    label = "validation gold (selected cells; band: lowest to highest seed)"
    img = plot_bands(out, "gold_vs_time", {f"{arm} ({key[-1]})": seed_band(seeded[key], "wall_time") for arm, key in chosen.items()},
                     "train seconds", label)
    return write_report(out, name, quick, [*parts, t_trace], [img])


def ordered_by_setting(rows: list[dict]) -> list[dict]:
    """summary rows with the setting's columns first, then the protocol's order (method, its settings, ...)."""
    first = list(setting_columns(8, 2, 1))
    return [{**{k: r[k] for k in first}, **{k: v for k, v in o.items() if k not in first}} for r, o in zip(rows, ordered(rows))]


def ratio_table(intervals: list[dict]) -> list[dict]:
    """A row per setting: ROCM's speed ratios and its test-gold gap to RLCM, each as estimate [interval]."""
    table: dict[str, dict] = {}
    for q in intervals:
        if q["versus"] and (q["quantity"].startswith("ratio_") or q["quantity"] == "gap_test_gold"):
            row = table.setdefault(q["setting"], {k: q[k] for k in ("setting", "action_dim", "K", "grid")})
            row[q["quantity"]] = interval_text(q)
    return list(table.values())


def run_grid(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1, jobs: int = 1,
             settings=None) -> Path:
    """ROCM vs RLCM over intrinsic dimension: the compositional digits grid at N = 1, 2, 3 (K = 2); quick: tiny models,
    N = 1, 2."""
    return run(out, quick, threads, steps, seeds, jobs, settings or (QUICK_GRID_SETTINGS if quick else GRID_SETTINGS), "scaling-grid")
