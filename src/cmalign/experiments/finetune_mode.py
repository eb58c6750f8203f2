"""LoRA vs full fine-tuning (the paper's open question) on the digits world at matched steps: gold, divergence,
accuracy, seconds per step and peak memory (CPU RSS of the training process); then the memory per rank of
full fine-tuning on 1 vs 2 ranks (FSDP2 over gloo), measured (peak RSS) and counted (the training state a
rank holds: its shard of the weights, gradients, AdamW moments and the frozen reference).

Every run trains in its own process (RSS is per process); --quick trains the tiny models in this process
(the numbers mean nothing) and leaves the 2-rank part out."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

from cmalign.config import load_preset, to_yaml, with_changes
from cmalign.experiments.common import eval_rows, make_config, plot, reusable, summary, write_report, write_table

# full fine-tuning moves every weight: its learning rate is not LoRA's (two of them, matched steps)
CELLS = {"lora lr=1e-4": dict(finetune="lora", lr=1e-4),
         "full lr=1e-5": dict(finetune="full", lr=1e-5),
         "full lr=3e-5": dict(finetune="full", lr=3e-5)}
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


def run(out: Path, quick: bool = False, threads: int = 1, steps: int | None = None) -> Path:
    steps = steps or (2 if quick else 150)
    rows, curves = [], {}
    cells = {k: v for k, v in CELLS.items() if not quick or k in ("lora lr=1e-4", "full lr=3e-5")}
    for label, changes in cells.items():
        small = dict(eval_size=4, eval_every=steps) if quick else {}  # the test: evaluation is most of the cost
        cfg = make_config(quick, threads, method="rocm", steps=steps, checkpoint_every=0, **small, **changes)
        run_dir = out / "runs" / label.replace(" ", "_").replace("=", "")
        if quick:  # the tiny models, in this process
            from cmalign.experiments.common import train_run

            metrics, rss = train_run(cfg, run_dir), [round(peak_rss_mb(), 1)]
        else:
            metrics, rss = _train_isolated(cfg, run_dir)
        s = summary(metrics)
        curves[label] = eval_rows(metrics)
        rows.append({"run": label, "steps": s["steps"], "gold_start": s["gold_start"], "gold_final": s["gold_final"],
                     "gold_peak": s["gold_peak"], "divergence_final": s["divergence_final"], "accuracy_final": s["accuracy_final"],
                     "proxy_final": s["proxy_final"], "s_per_step": s["s_per_step"], "peak_rss_mb": rss[0]})
    t1, _ = write_table(out, "summary", rows, f"LoRA vs full fine-tuning at {steps} matched steps (1 process)",
                        ["gold, divergence (the run's KL to the reference, summed over steps), accuracy: the fixed "
                         "evaluation chains at the last step; s_per_step excludes evaluation",
                         "peak_rss_mb: the training process's peak resident memory (Python, torch, the gold "
                         "classifiers and proxy included)"])
    parts, extra = [t1], []
    if not quick:
        ranks_rows = []
        for n in RANKS:
            # the same global batch on 1 and 2 ranks (16 chains), a short run: memory is the question here
            cfg = make_config(False, threads, method="rocm", steps=20, checkpoint_every=0, eval_every=20, finetune="full",
                              lr=3e-5, batch_size=16 // n)
            metrics, rss = _train_isolated(cfg, out / "runs" / f"full_{n}rank", ranks=n)
            count = state_bytes_per_rank(cfg, n)
            ranks_rows.append({"ranks": n, "batch_per_rank": 16 // n, **count, "peak_rss_mb_per_rank": " / ".join(f"{r:.0f}" for r in rss),
                               "s_per_step": summary(metrics)["s_per_step"]})
        t2, _ = write_table(out, "ranks", ranks_rows, "Full fine-tuning: memory per rank, 1 vs 2 ranks (FSDP2, gloo)",
                            ["state_mb_rank0: float32 weights, gradients and two AdamW moments of rank 0's shard, plus its "
                             "shard of the frozen reference (counted from the shapes)",
                             "peak_rss_mb_per_rank: measured; on this 1.1M-parameter network the process baseline "
                             "(libraries, classifiers) dwarfs the training state, so sharding barely shows in RSS"])
        parts.append(t2)
    imgs = [plot(out, "gold", {k: ([r["step"] for r in ev], [r["eval_gold"] for r in ev]) for k, ev in curves.items()}, "step", "gold (eval)"),
            plot(out, "divergence", {k: ([r["step"] for r in ev], [r.get("eval_divergence") or 0.0 for r in ev])
                                     for k, ev in curves.items()}, "step", "divergence to reference (eval)")]
    return write_report(out, "finetune-mode", quick, parts, imgs, extra)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
