"""LoRA export of the lcm world (issue 10 item 5): for any target set the diffusers file loads into a
stock pipeline with every tensor landed and reproduces our images; an incomplete one is refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import load_file

from cmalign.errors import UserError
from cmalign.worlds.lcm.lora import DIFFUSERS_LORA_FILE, OUR_ADAPTER, check_lora_loads_completely
from cmalign.worlds.lcm.unet import LCMWorld
from lcm_fixtures import perturb_lora_b, stock_pipeline, tiny_components, tiny_world
from test_lcm_world import rollout, stock_call

TARGET_SETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+conv1+ff": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "ff.net.2"],  # the case
    "no-attention": ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj", "ff.net.0.proj"],
}


def lora_param_count(unet) -> int:
    return sum(1 for name, _ in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name)


@pytest.mark.parametrize("targets", list(TARGET_SETS.values()), ids=list(TARGET_SETS))
def test_every_adapter_tensor_lands_in_the_stock_pipeline(tmp_path, targets):
    world = tiny_world(tmp_path / "ours", lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    perturb_lora_b(world.network, OUR_ADAPTER, std=0.05)
    world.save_adapter(tmp_path / "adapter")
    exported = load_file(tmp_path / "adapter" / DIFFUSERS_LORA_FILE)
    ours = lora_param_count(world.network)
    assert len(exported) == ours > 0
    assert all(".lora_A." in k or ".lora_B." in k for k in exported)  # one key format throughout

    pipe = stock_pipeline(tiny_components(tmp_path / "stock"))
    pipe.load_lora_weights(tmp_path / "adapter")
    assert lora_param_count(pipe.unet) == ours
    landed = {n.replace(".default_0.", "."): p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    trained = {n.replace(f".{OUR_ADAPTER}.", "."): p for n, p in world.network.named_parameters() if ".lora_" in n}
    assert landed.keys() == trained.keys() and all(torch.equal(landed[k], trained[k]) for k in trained)
    with torch.no_grad():
        images = world.decode(rollout(world, 2).x0).clamp(0, 1)
        with world.reference_policy():
            base = world.decode(rollout(world, 2).x0).clamp(0, 1)
    assert (images - base).abs().max() > 1e-3  # the adapter is visible, so equality below means something
    assert (images - stock_call(pipe, 2, world.guidance_scale, "pt")).abs().max() < 1e-5


def test_a_lora_that_would_load_incompletely_is_refused(tmp_path, monkeypatch):
    targets = TARGET_SETS["attention+conv1+ff"]
    world = tiny_world(tmp_path / "ours", lora_rank=4, lora_alpha=4.0, lora_targets=targets)
    perturb_lora_b(world.network, OUR_ADAPTER)
    # the old export: attention keys renamed to lora.down/up, the others left in peft's lora_A/lora_B
    mixed = convert_state_dict_to_diffusers(world.adapter_state_dict())
    assert any("lora.down" in k for k in mixed) and any("lora_A" in k for k in mixed)
    path = tmp_path / "mixed" / DIFFUSERS_LORA_FILE
    LatentConsistencyModelPipeline.save_lora_weights(path.parent, unet_lora_layers=mixed, weight_name=path.name)
    with pytest.raises(UserError, match=r"would load incompletely .*: \d+ of \d+ tensors land") as info:
        check_lora_loads_completely(LatentConsistencyModelPipeline, world.network, OUR_ADAPTER, path)
    assert "\n" not in str(info.value)

    monkeypatch.setattr(LCMWorld, "adapter_state_dict", lambda self: mixed)
    with pytest.raises(UserError, match="not exported"):
        world.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / DIFFUSERS_LORA_FILE).exists()
