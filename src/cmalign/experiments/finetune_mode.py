"""LoRA vs full fine-tuning (the paper's open question) on the digits world at matched steps: gold, divergence,
accuracy, seconds per step and peak memory (CPU RSS of the training process); then the memory per rank of
full fine-tuning on 1 vs 2 ranks (FSDP2 over gloo), measured (peak RSS) and counted (the training state a
rank holds: its shard of the weights, gradients, AdamW moments and the frozen reference).

Every run trains in its own process (RSS is per process); --quick trains the tiny models in this process
(the numbers mean nothing) and leaves the 2-rank part out.

The comparison rows follow experiments/protocol.py: LoRA and full fine-tuning each over two learning rates (their
scales differ: full moves every weight), the lr of best final validation gold selected per mode, every reported
score from 500 fresh test chains with 95% intervals over seeds and chains. The default (one seed: four 150-step
runs in order, each in its own process, then the short 2-rank part) takes about 12 minutes on 2 cores; --seeds N
trains the four runs N times (the 2-rank part once)."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

from cmalign.config import load_preset, to_yaml, with_changes
from cmalign.experiments.common import make_config, reusable, summary, write_report, write_table

# mode -> its learning-rate grid (full fine-tuning moves every weight: its lr is not LoRA's), matched steps
CELLS = {"lora": (1e-4, 1e-3), "full": (1e-5, 3e-5)}
QUICK_CELLS = {"lora": (1e-4,), "full": (3e-5,)}
RANKS = (1, 2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def state_bytes_per_rank(cfg, ranks: int) -> dict:
    """The training state rank 0 holds under FSDP2's dim-0 sharding (padded), counted from the network's shapes:
    float32 weights + gradients + 2 AdamW moments of the policy, float32 weights of the frozen reference."""
    from cmalign.training.build import build_world

    net = build_world(cfg, "cpu", lora=False).network
    local = sum(math.ceil(p.shape[0] / ranks) * (p.numel() // max(p.shape[0], 1)) if p.dim() else p.numel()
                for p in net.parameters())
    total = sum(p.numel() for p in net.parameters())
    return {"params": total, "local_params_rank0": local, "state_mb_rank0": round(local * 4 * (4 + 1) / 2**20, 2)}


def _worker(config_path: str, out_json: str) -> None:
    """python -m cmalign.experiments.finetune_mode CONFIG OUT (or under torchrun): train, write this rank's peak RSS."""
    from cmalign.training.trainer import train

    cfg = load_preset(config_path)
    rank = int(os.environ.get("RANK", "0"))
    train(cfg, overwrite=True, progress=False)
    Path(f"{out_json}.rank{rank}").write_text(json.dumps({"rank": rank, "peak_rss_mb": round(peak_rss_mb(), 1)}))


def _train_isolated(cfg, run_dir: Path, ranks: int = 1) -> tuple[list[dict], list[float]]:
    """Train in a fresh process (or `ranks` torchrun ranks); metrics rows and each rank's peak RSS in MB."""
    from cmalign.experiments.common import read_metrics

    cfg = with_changes(cfg, output_dir=str(run_dir))
    rss_file = run_dir.parent / f"{run_dir.name}.rss.json"
    files = [Path(f"{rss_file}.rank{r}") for r in range(ranks)]
    if not (reusable(cfg, run_dir) and all(f.is_file() for f in files)):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config_path = run_dir.parent / f"{run_dir.name}.yaml"
        config_path.write_text(to_yaml(cfg))
        module = ["-m", "cmalign.experiments.finetune_mode", str(config_path), str(rss_file)]
        cmd = [sys.executable, *module] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_free_port()), *module]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads or 1)}
        subprocess.run(cmd, check=True, env=env)
    return read_metrics(run_dir), [json.loads(f.read_text())["peak_rss_mb"] for f in files]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_modes(out: Path, quick: bool, threads: int, steps: int, seeds: int) -> tuple[list[dict], dict, dict, list[dict]]:
    """Every (mode, lr, seed) run, each in its own process (RSS is per process; --quick: in this one): the summary
    rows, the test chains, "mode lr=X" -> [metrics rows of each seed], and a row of peak RSS per run (apart from
    summary.csv, whose columns reproduce exactly but for times)."""
    from cmalign.experiments.common import seed_cells, train_run
    from cmalign.experiments.protocol import cell_of, n_test_chains, read_test_chains, run_row

    rows, chains, curves, memory = [], {}, {}, []
    small = dict(eval_size=4, eval_every=steps) if quick else {}  # the test: evaluation is most of the cost
    for mode, lrs in (QUICK_CELLS if quick else CELLS).items():
        for lr in lrs:
            cfg = make_config(quick, threads, method="rocm", steps=steps, checkpoint_every=0, finetune=mode, lr=lr,
                              final_eval_size=n_test_chains(quick), **small)
            for (_, seed), (seed_cfg, run_dir) in seed_cells({mode: (cfg, out / "runs" / f"{mode}_lr{lr:g}")}, seeds).items():
                if quick:  # the tiny models, in this process
                    metrics, rss = train_run(seed_cfg, run_dir), [round(peak_rss_mb(), 1)]
                else:
                    metrics, rss = _train_isolated(seed_cfg, run_dir)
                scores = read_test_chains(run_dir)
                row = run_row(mode, seed_cfg, seed, metrics, scores)
                rows.append(row)
                memory.append({"method": mode, "lr": lr, "seed": seed, "peak_rss_mb": rss[0]})
                chains[(mode, cell_of(row), seed)] = scores
                curves.setdefault(f"{mode} lr={lr:g}", []).append(metrics)
    return rows, chains, curves, memory


def ranks_table(out: Path, threads: int) -> Path:
    """Full fine-tuning's memory per rank on 1 and 2 ranks (FSDP2 over gloo): measured and counted."""
    ranks_rows = []
    for n in RANKS:
        # the same global batch on 1 and 2 ranks (16 chains), a short run: memory is the question here
        cfg = make_config(False, threads, method="rocm", steps=20, checkpoint_every=0, eval_every=20, finetune="full",
                          lr=3e-5, batch_size=16 // n)
        metrics, rss = _train_isolated(cfg, out / "runs" / f"full_{n}rank", ranks=n)
        count = state_bytes_per_rank(cfg, n)
        ranks_rows.append({"ranks": n, "batch_per_rank": 16 // n, **count, "peak_rss_mb_per_rank": " / ".join(f"{r:.0f}" for r in rss),
                           "s_per_step": summary(metrics)["s_per_step"]})
    table, _ = write_table(out, "ranks", ranks_rows, "Full fine-tuning: memory per rank, 1 vs 2 ranks (FSDP2, gloo)",
                           ["state_mb_rank0: float32 weights, gradients and two AdamW moments of rank 0's shard, plus its "
                            "shard of the frozen reference (counted from the shapes)",
                            "peak_rss_mb_per_rank: measured; on this 1.1M-parameter network the process baseline "
                            "(libraries, classifiers) dwarfs the training state, so sharding barely shows in RSS"])
    return table


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None, seeds: int = 1) -> Path:
    from cmalign.experiments.common import plot_bands, seed_band
    from cmalign.experiments.protocol import protocol_intervals, write_data

    steps = steps or (2 if quick else 150)
    rows, chains, curves, memory = train_modes(out, quick, threads, steps, seeds)
    intervals, _ = protocol_intervals(rows, chains, reference="lora")
    parts = write_data(out, rows, intervals, f"LoRA vs full fine-tuning at {steps} matched steps, two lrs each (1 process a run)",
                       ["s_per_step excludes evaluation; test_kl_to_base: the per-step KL of the tuned to the base consistency "
                        "model on the test chains"])
    t_memory, _ = write_table(out, "memory", memory, "Peak memory of each training process",
                              ["peak_rss_mb: the process's peak resident memory (Python, torch, the gold classifiers and proxy "
                               "included)"])
    parts.append(t_memory)
    if not quick:
        parts.append(ranks_table(out, threads))
    band = "band: lowest to highest seed"
    imgs = [plot_bands(out, "gold", {k: seed_band(v, "step") for k, v in curves.items()}, "step", f"validation gold ({band})"),
            plot_bands(out, "divergence", {k: seed_band(v, "step", "eval_divergence") for k, v in curves.items()}, "step",
                       f"divergence to reference, validation ({band})")]
    return write_report(out, "finetune-mode", quick, parts, imgs)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
