"""The one comparison protocol of the experiments that compare methods (compute-matched, frontier; the summary
rows of nondiff, finetune-mode, hacking and generalization).

- Equal tuning: every method is run over a grid of the same size, lr {1e-4, 1e-3} x one knob of its own with two
  values (KNOBS), at the same steps x batch, with no wall-clock cap (an experiment that needs one states it).
- Validation selects, test reports: each arm's best cell is the one of highest final *validation* gold (the fixed
  evaluation chains the trainer scores every eval_every steps; mean over seeds); every reported number comes from
  the *test* evaluation, TEST_SIZE fresh chains scored once at the end of a run (final_eval_chains.csv).
- 95% intervals: a hierarchical percentile bootstrap (seeds with replacement, then test chains within each seed),
  RESAMPLES resamples from a fixed RNG seed, for every arm's test metrics, every gap between two arms' selected cells
  and every speed ratio (seeds only: one time per run).

An *arm* is one compared condition: a method (compute-matched), or a method at one setting (hacking's beta = 0 and
beta = 3); summary.csv's and intervals.csv's `method` column names it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from cmalign.experiments.common import eval_rows, make_config, plot_bands, seed_band, wall, write_table

LRS = (1e-4, 1e-3)
# method -> (summary column, config key, two values): the knob every method is tuned over beside lr.
# "K" stands for the chain length (DRaFT back-propagating through every step is AlignProp).
KNOBS = {
    "rocm": ("beta", "beta", (3.0, 6.0)),
    "dpok": ("beta", "beta", (0.01, 0.1)),
    "d3po": ("beta", "beta", (1.0, 10.0)),  # DPO's temperature
    "rlcm": ("clip", "ppo.clip", (1e-4, 1e-3)),
    "ddpo": ("clip", "ppo.clip", (1e-4, 1e-3)),
    "draft": ("backprop_steps", "backprop_steps", (1, "K")),
}
HPARAMS = ("lr", "beta", "clip", "backprop_steps")
# The compared methods (compute-matched, frontier): each its own arm, its knob set by the grid (beta 0 where the
# method has no divergence term; draft forces it).
METHOD_ARMS = {
    "rocm": dict(method="rocm"),
    "rlcm": dict(method="rlcm", beta=0.0),
    "ddpo": dict(method="ddpo", beta=0.0),
    "draft": dict(method="draft", beta=0.0),
    "dpok": dict(method="dpok"),
    "d3po": dict(method="d3po"),
}
TEST_SIZE = 500  # fresh test chains per run
QUICK_TEST_SIZE = 16  # --quick (tiny models, the tests): the same code path in seconds
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# test columns of summary.csv -> the per-chain column of final_eval_chains.csv behind each
TEST_METRICS = {"test_gold": "gold", "test_accuracy": "accuracy", "test_kl_to_base": "kl_to_base",
                "test_distance_to_base": "distance_to_base", "test_heldout_proxy": "heldout_proxy", "test_proxy": "reward",
                "test_proxy_drop": "proxy_drop", "test_base_gold": "base_gold"}
VAL_METRICS = {"val_gold": "eval_gold", "val_kl_to_base": "eval_kl_to_base", "val_distance_to_base": "eval_distance_to_base"}


def is_timing(column: str) -> bool:
    """Columns of wall-clock seconds (train_s, s_per_step, time_...): the only ones of summary.csv that differ
    between reruns of the same command; quantities of intervals.csv named ratio_* are ratios of them."""
    return column.startswith(("time_", "s_per_")) or column.endswith("_s")


def significant(value, digits: int = 5):
    """value to `digits` significant digits (floats only): small files, and reruns that agree to the printed digit."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


# --- the grid ------------------------------------------------------------------------------------------------
def tuning_grid(method: str, quick: bool, num_steps: int) -> list[dict]:
    """The cells of a method's grid as summary columns ({"lr": ..., knob: ...}): LRS x its knob's two values;
    --quick the first value of each (the same code path, one cell)."""
    column, _, values = KNOBS[method]
    values = [num_steps if v == "K" else v for v in values]
    lrs = LRS[-1:] if quick else LRS
    return [{"lr": lr, column: v} for lr in lrs for v in (values[:1] if quick else values)]


def cell_overrides(method: str, cell: dict) -> dict:
    """make_config overrides of a grid cell: its columns under their config keys."""
    keys = {"lr": "lr", KNOBS[method][0]: KNOBS[method][1]}
    return {keys[k]: v for k, v in cell.items()}


def cell_name(arm: str, cell: dict) -> str:
    return arm + "".join(f"-{k}{v:g}" for k, v in cell.items())


def grid_cells(arms: dict[str, dict], out: Path, quick: bool, threads: int, steps: int, **common) -> dict:
    """(arm, cell name) -> (config, run directory) for every cell of every arm's grid; arms: label -> settings,
    whose "method" picks the grid. Every run is scored on the test chains at its end."""
    cells = {}
    num_steps = make_config(quick, threads, **common).num_steps
    for arm, settings in arms.items():
        for cell in tuning_grid(settings["method"], quick, num_steps):
            cfg = make_config(quick, threads, steps=steps, **{**common, **settings, **cell_overrides(settings["method"], cell)},
                              final_eval_size=n_test_chains(quick))
            cells[(arm, cell_name(arm, cell))] = (cfg, out / "runs" / cell_name(arm, cell))
    return cells


def fixed_cells(arms: dict[str, dict], out: Path, quick: bool, threads: int, steps: int, **common) -> dict:
    """(arm, arm) -> (config, run directory out/runs/ARM) of arms that are one setting each (hacking's betas):
    nothing to select, but the same test evaluation and rows as a grid."""
    return {(arm, arm): (make_config(quick, threads, steps=steps, **{**common, **settings}, final_eval_size=n_test_chains(quick)),
                         out / "runs" / arm) for arm, settings in arms.items()}


def n_test_chains(quick: bool) -> int:
    return QUICK_TEST_SIZE if quick else TEST_SIZE


def hyperparameters(cfg) -> dict:
    """The summary columns of a run's tuned settings: lr and its method's knob (draft's unset backprop_steps is 1)."""
    column, key, _ = KNOBS.get(cfg.method, ("beta", "beta", ()))
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    return {"lr": cfg.lr, column: 1 if value is None and column == "backprop_steps" else value}


# --- a row per run -------------------------------------------------------------------------------------------
def read_test_chains(run_dir: Path) -> dict[str, np.ndarray]:
    """final_eval_chains.csv's score columns, with `proxy_drop`: how much more the tuned model gained on the
    training proxy than on the held-out one (0 for the base model: a method-neutral measure of over-fitting
    the proxy, beside the distances to the base)."""
    with open(run_dir / "final_eval_chains.csv", newline="") as f:
        table = list(csv.DictReader(f))
    columns = {k: np.array([float(r[k]) for r in table]) for k in table[0] if k not in ("index", "prompt")}
    if {"reward", "heldout_proxy", "base_reward", "base_heldout_proxy"} <= set(columns):
        columns["proxy_drop"] = (columns["reward"] - columns["heldout_proxy"]) - (columns["base_reward"] - columns["base_heldout_proxy"])
    return columns


def validation_columns(rows: list[dict]) -> dict:
    """The last validation evaluation (what selects), its proxy drop from step 0 (the base model) and the peak gold."""
    ev = eval_rows(rows)
    first, last = ev[0], ev[-1]
    out = {k: "" if last.get(key) is None else last[key] for k, key in VAL_METRICS.items()}
    gap = lambda r: r["eval_reward"] - r["eval_heldout_proxy"]  # noqa: E731
    has_both = all(r.get("eval_reward") is not None and r.get("eval_heldout_proxy") is not None for r in (first, last))
    out["val_proxy_drop"] = gap(last) - gap(first) if has_both else ""
    out["val_gold_peak"] = max(r.get("eval_gold", -math.inf) for r in ev)
    return out


def run_row(arm: str, cfg, seed: int, rows: list[dict], chains: dict[str, np.ndarray], metrics: dict = TEST_METRICS) -> dict:
    """summary.csv's row of one run: arm, tuned settings, seed, validation and test scores (metrics: column ->
    test chain column), samples and times."""
    steps = max(r["step"] for r in rows)
    row = {"method": arm, **hyperparameters(cfg), "seed": seed, "selected": 0, **validation_columns(rows)}
    row.update({k: float(chains[c].mean()) if c in chains else "" for k, c in metrics.items()})
    row.update({"n_test": len(next(iter(chains.values()))), "steps_done": steps, "samples": rows[-1].get("samples", 0),
                "train_s": round(wall(rows[-1]), 2), "s_per_step": round(wall(rows[-1]) / max(steps, 1), 4)})
    return {k: significant(v) for k, v in row.items()}


def collect_runs(cells: dict, seeded: dict) -> tuple[list[dict], dict, dict]:
    """Summary rows of every run (cells' order, then seed), (arm, cell, seed) -> its test chain columns, and
    (arm, cell) -> its key in cells. cells: (arm, name) -> (config, run directory); seeded: the same keys ->
    [metrics rows of seed 0, 1, ...] (seeded_train_runs)."""
    rows, chains, keys = [], {}, {}
    for key, (cfg, run_dir) in cells.items():
        for seed, metrics in enumerate(seeded[key]):
            scores = read_test_chains(run_dir / f"seed{seed}")
            row = run_row(key[0], cfg, seed, metrics, scores)
            rows.append(row)
            chains[(row["method"], cell_of(row), seed)] = scores
            keys[(row["method"], cell_of(row))] = key
    return rows, chains, keys


def cell_of(row: dict) -> tuple:
    """A cell's identity within its arm: its tuned settings."""
    return tuple((k, row[k]) for k in HPARAMS if row.get(k, "") != "")


def cell_means(rows: list[dict], column: str) -> dict[tuple, float]:
    """(arm, cell) -> the mean of `column` over the cell's seeds (nan where a run has no value)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], cell_of(r)), []).append(float(r[column]) if r.get(column, "") != "" else math.nan)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def select(rows: list[dict], within: tuple[str, float] | None = None) -> dict[str, tuple]:
    """arm -> its cell of highest seed-mean validation gold (the first in grid order on a tie); within
    (validation column, budget): only among the cells whose seed-mean value there is at most the budget."""
    gold = cell_means(rows, "val_gold")
    allowed = cell_means(rows, within[0]) if within else {}
    best: dict[str, tuple] = {}
    for (arm, cell), g in gold.items():
        if within and not allowed[(arm, cell)] <= within[1] + 1e-12:
            continue
        if math.isfinite(g) and (arm not in best or g > gold[(arm, best[arm])]):
            best[arm] = cell
    return best


def mark_selected(rows: list[dict]) -> dict[str, tuple]:
    """Set `selected` on the runs of each arm's validation-best cell; return arm -> that cell."""
    best = select(rows)
    for r in rows:
        r["selected"] = int(best.get(r["method"]) == cell_of(r))
    return best


# --- intervals -----------------------------------------------------------------------------------------------
def bootstrap(groups: list[np.ndarray], statistic=lambda a: a) -> tuple[float, float, float]:
    """statistic of the groups' seed-mean chain means, and its 95% hierarchical percentile interval.

    groups: one (seeds, chains) array per compared cell; row i of every group is seed i, and chain j of seed i is
    the same test prompt and noise in every group, so seeds and chains are resampled jointly (paired) across the
    groups. A (seeds, 1) array (a time per run) resamples seeds only. The RNG restarts from BOOTSTRAP_SEED for
    every quantity: the interval of one quantity does not depend on which others were computed."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n_seeds, n_chains = groups[0].shape
    seeds = rng.integers(n_seeds, size=(RESAMPLES, n_seeds))
    chains = rng.integers(n_chains, size=(RESAMPLES, n_seeds, n_chains))
    resampled = [g[seeds[:, :, None], chains].mean(axis=2).mean(axis=1) for g in groups]
    with np.errstate(divide="ignore", invalid="ignore"):  # a ratio to a time of 0 or inf: inf / nan, sorted last
        estimate = float(statistic(*[np.float64(g.mean(axis=1).mean()) for g in groups]))
        values = np.sort(statistic(*resampled))
    low, high = int(0.025 * RESAMPLES), int(math.ceil(0.975 * RESAMPLES)) - 1
    return estimate, float(values[low]), float(values[high])


def interval_row(quantity: str, arm: str, versus: str, result: tuple, seeds: int, n_test) -> dict:
    estimate, lo, hi = (significant(v) for v in result)
    return {"quantity": quantity, "method": arm, "versus": versus, "estimate": estimate, "lo": lo, "hi": hi,
            "seeds": seeds, "n_test": n_test}


def chain_matrix(chains: dict, arm: str, cell: tuple, column: str) -> np.ndarray | None:
    """(seeds, test chains) of one score of a cell's runs, seed 0 first; None where the runs lack it."""
    runs = sorted((seed, c) for (a, k, seed), c in chains.items() if a == arm and k == cell)
    if not runs or any(column not in c for _, c in runs) or len({len(c[column]) for _, c in runs}) > 1:
        return None
    return np.stack([c[column] for _, c in runs])


def metric_intervals(chains: dict, selected: dict[str, tuple], metrics=TEST_METRICS, suffix: str = "") -> list[dict]:
    """A row per selected cell and test metric: its seed-mean test mean and 95% interval."""
    out = []
    for arm, cell in selected.items():
        for quantity, column in metrics.items():
            m = chain_matrix(chains, arm, cell, column)
            if m is not None:
                out.append(interval_row(quantity + suffix, arm, "", bootstrap([m]), *m.shape))
    return out


def gap_intervals(chains: dict, selected: dict[str, tuple], reference: str, metrics=("test_gold", "test_accuracy"),
                  suffix: str = "") -> list[dict]:
    """reference's selected cell minus every other arm's, in each test metric (paired on seeds and chains);
    metrics: names of TEST_METRICS, or {quantity: test chain column}."""
    out = []
    if reference not in selected:
        return out
    columns = metrics if isinstance(metrics, dict) else {q: TEST_METRICS[q] for q in metrics}
    for arm, cell in selected.items():
        for quantity, column in columns.items() if arm != reference else ():
            a = chain_matrix(chains, reference, selected[reference], column)
            b = chain_matrix(chains, arm, cell, column)
            if a is not None and b is not None and a.shape == b.shape:
                out.append(interval_row(f"gap_{quantity}{suffix}", reference, arm, bootstrap([a, b], np.subtract), *a.shape))
    return out


def ratio_intervals(rows: list[dict], selected: dict[str, tuple], reference: str, timings=("train_s", "s_per_step")) -> list[dict]:
    """reference's selected cell over every other arm's, in each timing column: the ratio of seed-mean times,
    seeds resampled in pairs (one time per run, so there are no chains to resample)."""
    def times(arm: str, column: str) -> np.ndarray:
        return np.array([[float(r[column])] for r in sorted(rows, key=lambda r: r["seed"])
                         if r["method"] == arm and cell_of(r) == selected[arm]])

    out = []
    for arm in selected if reference in selected else ():
        for column in timings if arm != reference else ():
            a, b = times(reference, column), times(arm, column)
            if len(a) and a.shape == b.shape:
                out.append(interval_row(f"ratio_{column}", reference, arm, bootstrap([a, b], np.divide), len(a), ""))
    return out


def selected_keys(selected: dict[str, tuple], keys: dict) -> dict[str, tuple]:
    """arm -> the cells key of its selected cell (selected: protocol_intervals' arm -> cell; keys: collect_runs')."""
    return {arm: keys[(arm, cell)] for arm, cell in selected.items()}


def trained_evals(rows: list[dict]) -> list[dict]:
    """The validation evaluations after step 0 (step 0 is the base model, reached in no time by every method)."""
    return [r for r in eval_rows(rows) if r["step"] > 0]


def seconds_to(rows: list[dict], target: float, kl_budget: float = math.inf) -> float:
    """Train seconds of the first validation evaluation after step 0 with gold at or above target and KL to the base
    model at most kl_budget (inf: never)."""
    return next((wall(r) for r in trained_evals(rows) if r["eval_gold"] >= target - 1e-9
                 and (kl_budget == math.inf or r.get("eval_kl_to_base", math.inf) <= kl_budget + 1e-12)), math.inf)


def best_point(rows: list[dict]) -> dict:
    """The validation evaluation after step 0 of most gold (the first on a tie)."""
    evals = trained_evals(rows)
    return max(evals, key=lambda r: (r["eval_gold"], -evals.index(r)))


def target_ratio_intervals(seeded: dict, chosen: dict[str, tuple], reference: str, within_kl: bool = False) -> list[dict]:
    """ratio_s_to_target: seed by seed, the target is the other arm's own best validation gold after step 0 (of its
    selected cell) and the ratio is the reference's train seconds to first reach it over the other arm's (inf: the
    reference never reached it in some seed); seeds resampled in pairs. within_kl: ratio_s_to_target_within_kl, the
    reference must get there at no larger KL to the base model than the other arm had at its best (a method-neutral
    measure: the same for every method). Times come from the validation curves: the test chains are scored only at
    the end of a run."""
    out = []
    for arm, key in chosen.items():
        if arm == reference or reference not in chosen:
            continue
        ref_runs, runs = seeded[chosen[reference]], seeded[key]
        bests = [best_point(rows) for rows in runs]
        budgets = [float(b.get("eval_kl_to_base", math.inf)) if within_kl else math.inf for b in bests]
        ref_s = np.array([[seconds_to(rows, b["eval_gold"], kl)] for rows, b, kl in zip(ref_runs, bests, budgets)])
        base_s = np.array([[seconds_to(rows, b["eval_gold"], kl)] for rows, b, kl in zip(runs, bests, budgets)])
        name = "ratio_s_to_target" + ("_within_kl" if within_kl else "")
        out.append(interval_row(name, reference, arm, bootstrap([ref_s, base_s], np.divide), len(runs), ""))
    return out


# --- the data files ------------------------------------------------------------------------------------------
def ordered(rows: list[dict]) -> list[dict]:
    """Rows with one set of columns: method, the settings any row has (HPARAMS order), then the rest; "" where a
    row has no value (a method without that knob)."""
    used = [h for h in HPARAMS if any(h in r for r in rows)]
    rest = list(dict.fromkeys(k for r in rows for k in r if k not in HPARAMS and k != "method"))
    return [{k: r.get(k, "") for k in ["method", *used, *rest]} for r in rows]


def write_data(out: Path, rows: list[dict], intervals: list[dict], title: str, notes: list[str] = ()) -> list[Path]:
    """selected.md (each arm's selected cell, for reading), summary.csv/.md (a row per run) and intervals.csv/.md (a
    row per reported quantity)."""
    selected_md, _ = write_table(out, "selected", selected_table(rows, intervals) or [{"method": ""}],
                                 "Each method's cell of best validation gold, scored on the test chains",
                                 ["estimate [95% interval] over seeds and test chains (intervals.csv); X (m - this): method m's "
                                  "selected cell minus this one's; ratio_X (m / this): m's seconds over this one's"])
    summary_md, _ = write_table(out, "summary", ordered(rows), title, [
        "a row per run; selected = 1: the cell of its method's highest validation gold (mean over seeds); val_*: the "
        "last evaluation of the fixed validation chains; test_*: the mean over the fresh test chains scored at the end "
        "(n_test); proxy_drop: the gain of the training proxy minus that of the held-out proxy (0: the base model)",
        *notes])
    intervals_md, _ = write_table(out, "intervals", intervals or [dict.fromkeys(("quantity", "method", "versus", "estimate", "lo", "hi", "seeds", "n_test"), "")],
                                  "Reported quantities with 95% intervals", [
        f"hierarchical percentile bootstrap: {RESAMPLES} resamples of the seeds, then of the test chains within each seed "
        f"(RNG seed {BOOTSTRAP_SEED}); gap_X: method minus versus, paired on seeds and chains (the same test noise); "
        "ratio_X: method's seed-mean time over versus's, seeds resampled (n_test empty)"])
    return [selected_md, intervals_md, summary_md]


def interval_text(r: dict) -> str:
    return f"{r['estimate']:.4g} [{r['lo']:.4g}, {r['hi']:.4g}]" if r["estimate"] != "" else "–"


def selected_table(rows: list[dict], intervals: list[dict], shown=("test_gold", "test_accuracy", "test_kl_to_base",
                                                                  "test_distance_to_base")) -> list[dict]:
    """A row per arm, for reading: its selected cell, its test metrics and the reference's gaps and ratios to it,
    each as estimate [95% interval]."""
    table = {}
    for r in rows:
        if r["selected"] and r["method"] not in table:
            table[r["method"]] = {"method": r["method"], "cell": " ".join(f"{k}={v:g}" for k, v in cell_of(r)),
                                  "seeds": sum(q["method"] == r["method"] and q["selected"] for q in rows)}
    for q in intervals:
        if "@" in q["quantity"]:
            continue  # within-budget selections have their own table
        if not q["versus"] and q["quantity"] in shown and q["method"] in table:
            table[q["method"]][q["quantity"]] = interval_text(q)
        elif q["versus"] in table:
            name, sign = (q["quantity"][len("gap_"):], "-") if q["quantity"].startswith("gap_") else (q["quantity"], "/")
            table[q["versus"]][f"{name} ({q['method']} {sign} this)"] = interval_text(q)
    return list(table.values())


def protocol_intervals(rows: list[dict], chains: dict, reference: str | None,
                       timings=("train_s", "s_per_step")) -> tuple[list[dict], dict[str, tuple]]:
    """Mark each arm's selected cell; the intervals of its every test metric and of the reference arm's gaps and
    speed ratios to the others' selected cells; and arm -> its selected cell."""
    selected = mark_selected(rows)
    out = metric_intervals(chains, selected)
    if reference:
        out += gap_intervals(chains, selected, reference) + ratio_intervals(rows, selected, reference, timings)
    return out, selected


# --- curves --------------------------------------------------------------------------------------------------
def trace_rows(seeded: dict) -> list[dict]:
    """Every validation evaluation of every run (cells key (arm, cell name) -> [metrics rows per seed])."""
    return [{"method": arm, "cell": name, "seed": s, "step": r["step"], "samples": r.get("samples", 0), "wall_time": wall(r),
             "gold": significant(float(r["eval_gold"])), "accuracy": significant(float(r.get("eval_accuracy", math.nan))),
             "reward": significant(float(r.get("eval_reward", math.nan)))}
            for (arm, name), runs in seeded.items() for s, rows in enumerate(runs) for r in eval_rows(rows)]


def selected_curve_plots(out: Path, seeded: dict, chosen: dict[str, tuple]) -> list[Path]:
    """Validation gold of each arm's selected cell against train seconds and samples: the seed mean with a band
    from the lowest to the highest seed. chosen: arm -> its cells key."""
    curves = {f"{arm} ({key[1]})": seeded[key] for arm, key in chosen.items()}
    label = "validation gold (selected cells; band: lowest to highest seed)"
    return [plot_bands(out, "gold_vs_time", {k: seed_band(v, "wall_time") for k, v in curves.items()}, "train seconds", label),
            plot_bands(out, "gold_vs_samples", {k: seed_band(v, "samples") for k, v in curves.items()}, "samples", label)]
