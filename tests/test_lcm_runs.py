"""Whole lcm runs on a tiny SD-1.5 LCM folder: exact resume from an intermediate checkpoint, and prompt caches
that do not depend on the batch. (2 ranks on every lcm family, the export after DDP's in-place `replicate` in the
stock pipeline included: test_guarantees_matrix.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cmalign.cli import main
from cmalign.worlds.lcm.lora import PEFT_ADAPTER_FILE
from lcm_fixtures import RESOLUTION, save_tiny_pipeline, tiny_clip

PROMPTS = ["a red cat", "a dog", "a cow"]


def lcm_args(model: Path, clip: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", str(RESOLUTION), "--lcm.guidance-scale", "8",
            "--prompts", *PROMPTS, "--eval-prompts", "a bird", "--reward-weights", "clip_score=1.0",
            "--reward-paths", f"clip_score={clip}", "--lora-rank", "4", "--lora-alpha", "4", "--num-steps", "2",
            "--eval-every", "100", "--eval-size", "1", "--grid-every", "100", "--report-to", "none", "--device", "cpu",
            "--threads", "1", "--mixed-precision", "no", "--output-dir", str(run), *extra]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / PEFT_ADAPTER_FILE)


def metrics_without_clock(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def test_resume_from_an_intermediate_checkpoint_is_bit_identical(tmp_path, monkeypatch):
    """A resumed process starts with cold prompt caches (the lcm world's text states, the CLIP reward's text
    embeddings) and fills them from other batches than the uninterrupted run did; a prompt's cached value must
    not depend on the batch it was first encoded in, or the run drifts in the last bits from the first step after
    the resume (here: the reward of step 3)."""
    from cmalign.rewards.text_to_image import clip as clip_rewards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, (clip, _) = save_tiny_pipeline(tmp_path / "fix"), tiny_clip(tmp_path / "clip")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--batch-size", "2", "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "5",
              "--final-eval-size", "0", "--eval-every", "3", "--beta", "0.1", "--lr", "0.05")
    monkeypatch.setattr(clip_rewards, "_EMBEDDERS", {})  # each run a fresh process: no warm reward model
    assert main(lcm_args(model, clip, full, *common)) == 0
    shutil.copytree(full, resumed)
    monkeypatch.setattr(clip_rewards, "_EMBEDDERS", {})
    assert main(lcm_args(model, clip, resumed, *common, "--resume", str(resumed / "checkpoints" / "step_000002"))) == 0
    a, b = adapter(full), adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert (full / "adapter" / PEFT_ADAPTER_FILE).read_bytes() == (resumed / "adapter" / PEFT_ADAPTER_FILE).read_bytes()
    assert metrics_without_clock(resumed) == metrics_without_clock(full)
    assert [r["step"] for r in metrics_without_clock(resumed)] == list(range(7))


def test_a_prompt_encodes_alike_alone_or_in_any_batch(tmp_path):
    """The cached text states and CLIP text embeddings of a prompt are bit-identical whichever prompts missed
    the cache with it."""
    from cmalign.rewards.text_to_image.clip import CLIPEmbedder, load_clip_tokenizer
    from lcm_fixtures import tiny_world

    _, clip_model = tiny_clip(tmp_path / "clip")
    tokenizer = load_clip_tokenizer(str(tmp_path / "clip"), "clip_score", clip_model.config.text_config, "test")
    world = tiny_world(tmp_path / "world")
    batched = (world._text_states(PROMPTS)[0], CLIPEmbedder(clip_model, tokenizer, "cpu", torch.float32).text_embeddings(PROMPTS))
    world._text_cache.clear()
    embedder = CLIPEmbedder(clip_model, tokenizer, "cpu", torch.float32)
    for p in reversed(PROMPTS):
        world._text_states([p]), embedder.text_embeddings([p])
    alone = (world._text_states(PROMPTS)[0], embedder.text_embeddings(PROMPTS))
    assert all(torch.equal(x, y) for x, y in zip(batched, alone))
