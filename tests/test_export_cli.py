"""`cmalign export` on a tiny SD-1.5 LCM run (2 steps, trained with --export-formats diffusers,kohya): the kohya
file follows sd-scripts' key scheme, loads through stock diffusers' own kohya path with every LoRA layer landed,
and gives the diffusers export's images; the peft folder loads with PeftModel.from_pretrained; and a table of
refusals (one `cmalign: error:` line, exit 2, no file changed)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from peft import PeftModel
from safetensors.torch import load_file

from cmalign.cli import main
from cmalign.config import TrainConfig, with_changes
from cmalign.errors import UserError
from cmalign.export import check_run_formats
from cmalign.worlds.lcm.config import LCMConfig
from cmalign.worlds.lcm.kohya import KOHYA_KEY
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, KOHYA_FILE, PEFT_ADAPTER_FILE
from lcm_fixtures import RESOLUTION, save_tiny_pipeline, tiny_clip
from test_bad_inputs import snapshot

PROMPTS = ["a red cat", "a dog"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # attention and resnet convs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(model folder, run directory) of a 2-step lcm run that also wrote adapter/lora_kohya.safetensors."""
    root = tmp_path_factory.mktemp("export")
    model, (clip, _) = save_tiny_pipeline(root / "fix"), tiny_clip(root / "clip")
    run = root / "run"
    args = ["train", "--world", "lcm", "--lcm.model", str(model), "--lcm.resolution", str(RESOLUTION),
            "--lcm.guidance-scale", "8", "--prompts", *PROMPTS, "--eval-prompts", "a bird",
            "--reward-weights", "clip_score=1.0", "--reward-paths", f"clip_score={clip}", "--lora-rank", "4",
            "--lora-alpha", "8", "--num-steps", "2", "--steps", "2", "--batch-size", "1", "--lr", "0.05",
            "--eval-every", "100", "--eval-size", "1", "--grid-every", "100", "--final-eval-size", "1",
            "--report-to", "none", "--device", "cpu", "--threads", "1", "--mixed-precision", "no",
            "--lcm.lora-targets", *TARGETS, "--export-formats", "diffusers,kohya", "--output-dir", str(run)]
    assert main(args) == 0
    return model, run


def stock(model):
    pipe = LatentConsistencyModelPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_tensors(module, adapter_suffix=".default_0.") -> dict[str, torch.Tensor]:
    return {n.replace(adapter_suffix, "."): p for n, p in module.named_parameters() if ".lora_" in n}


@torch.no_grad()
def images(pipe) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=8.0, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


def test_kohya_export_loads_whole_through_stock_diffusers_and_matches_the_diffusers_export(finished, tmp_path):
    model, run = finished
    out = tmp_path / "F.safetensors"
    assert main(["export", "--run", str(run), "--format", "kohya", "--out", str(out)]) == 0
    kohya = load_file(out)
    assert kohya and all(KOHYA_KEY.match(k) for k in kohya)
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_mid_block_", "lora_unet_up_blocks_"))
               for k in kohya)  # SD-1.x: diffusers-style module names, as sd-scripts writes them
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # rank 4, scale 2
    written = load_file(run / "adapter" / KOHYA_FILE)  # what the run wrote at its end (--export-formats)
    assert written.keys() == kohya.keys() and all(torch.equal(written[k], kohya[k]) for k in kohya)

    from_diffusers, from_kohya, base = stock(model), stock(model), stock(model)
    from_diffusers.load_lora_weights(run / "adapter")
    from_kohya.load_lora_weights(out.parent, weight_name=out.name)  # diffusers' non-diffusers (kohya) path
    ours = {k.removeprefix("base_model.model."): v for k, v in load_file(run / "adapter" / PEFT_ADAPTER_FILE).items()}
    landed = lora_tensors(from_kohya.unet)
    assert len(landed) == len(ours) == 2 * len(kohya) // 3 > 0  # every LoRA layer landed ...
    assert all(torch.equal(landed[k], v) for k, v in ours.items())  # ... with our tensors
    scales = {m.scaling[a] for m in from_kohya.unet.modules() if hasattr(m, "scaling") for a in m.scaling}
    assert scales == {2.0}
    reference = images(from_diffusers)
    assert (reference - images(base)).abs().max() > 1e-3  # the LoRA is visible, so the equality means something
    diff = (images(from_kohya) - reference).abs().max().item()
    print(f"kohya vs diffusers export, max image difference: {diff:.3g}")
    assert diff <= 1e-5


def test_diffusers_and_peft_exports_load_whole(finished, tmp_path):
    model, run = finished
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "d" / DIFFUSERS_LORA_FILE)]) == 0
    exported = load_file(tmp_path / "d" / DIFFUSERS_LORA_FILE)
    original = load_file(run / "adapter" / DIFFUSERS_LORA_FILE)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)

    assert main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    unet = stock(model).unet
    loaded = PeftModel.from_pretrained(unet, str(tmp_path / "p"))
    ours = load_file(run / "adapter" / PEFT_ADAPTER_FILE)
    landed = {k.removeprefix("base_model.model."): v for k, v in lora_tensors(loaded, ".default.").items()}
    assert len(landed) == len(ours) > 0 and all(torch.equal(landed[k.removeprefix("base_model.model.")], v)
                                                for k, v in ours.items())


def _refused(capsys, args, words, root):
    before = snapshot(root)
    code = main(args)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("cmalign: warning: ")]
    assert code == 2 and len(err) == 1 and err[0].startswith("cmalign: error:"), (args, err)
    assert words in err[0], (args, err[0])
    assert snapshot(root) == before, args


def fake_run(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (folder / "adapter").mkdir()
    return folder


def test_refusals(finished, tmp_path, capsys):
    _, run = finished
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("world: lcm\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken.safetensors").write_text("a user's file")
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    digits = fake_run(tmp_path / "digits_run", world="digits")
    pixart_run = fake_run(tmp_path / "pixart_run", world="lcm", lcm={"model": str(pixart)})
    full = fake_run(tmp_path / "full_run", world="lcm", finetune="full", lcm={"model": str(pixart)})
    cases = [
        (["--run", str(tmp_path), "--format", "kohya"], "not a run directory"),
        (["--run", str(tmp_path / "unfinished"), "--format", "kohya"], "the run did not finish"),
        (["--run", str(run), "--format", "kohya", "--out", str(tmp_path / "a_file" / "F.safetensors")], "a_file"),
        (["--run", str(run), "--format", "kohya", "--out", str(tmp_path / "taken.safetensors")], "pass --overwrite"),
        (["--run", str(run), "--format", "kohya", "--out", str(tmp_path / "F.ckpt")], "must name a .safetensors file"),
        (["--run", str(run), "--format", "peft", "--out", str(tmp_path / "a_file")], "is a file"),
        (["--run", str(run), "--format", "onnx"], "onnx"),
        (["--run", str(digits), "--format", "kohya"], "digits world's adapter (adapter/) is in its own format only"),
        (["--run", str(pixart_run), "--format", "kohya"], "exports as peft only"),
        (["--run", str(full), "--format", "diffusers"], "finetune full"),
    ]
    for args, words in cases:
        _refused(capsys, ["export", *args], words, tmp_path)
    _refused(capsys, ["export", "--run", str(run), "--format", "kohya", "--out", str(run / "adapter" / KOHYA_FILE)],
             "pass --overwrite", run)
    _refused(capsys, ["train", "--export-formats", "kohya", "--output-dir", str(tmp_path / "r")],
             "digits world writes its adapter in its own format only", tmp_path)
    _refused(capsys, ["train", "--lcm.export-formats", "onnx", "--output-dir", str(tmp_path / "r")],
             "lcm.export_formats: unknown format 'onnx'", tmp_path)
    assert not (tmp_path / "r").exists()


def test_a_family_without_kohya_is_refused_before_training():
    class FakePixArt:
        name, family, config_sections = "lcm", "pixart", {"lcm": LCMConfig}

    cfg = with_changes(TrainConfig(world="lcm"), **{"lcm.export_formats": ["kohya"]})
    with pytest.raises(UserError, match="export_formats: cannot write kohya: .* peft only"):
        check_run_formats(FakePixArt(), cfg)
    check_run_formats(FakePixArt(), with_changes(cfg, **{"lcm.export_formats": ["peft"]}))  # written anyway
    assert LCMConfig(export_formats=["diffusers,kohya"]).export_formats == ["diffusers", "kohya"]
