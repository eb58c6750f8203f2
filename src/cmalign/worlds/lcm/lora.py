"""Our LoRA adapter on a consistency model's network: its spec, the reference policy of a stacked LCM-LoRA,
and the checks that an exported adapter loads completely into a stock pipeline (diffusers' LoRA loader for
the UNet families and SANA-Sprint's transformer, PeftModel.from_pretrained for PixArt). Shared by unet.py, sana.py
and pixart.py."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights

from cmalign.errors import UserError
from cmalign.worlds.base import model_class

OUR_ADAPTER = "rocm"  # our trainable LoRA
LCM_ADAPTER = "lcm"  # a stacked LCM-LoRA: frozen, part of both the policy and the reference
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what a stock pipeline's load_lora_weights reads
PEFT_ADAPTER_FILE, PEFT_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # for resuming
PEFT_PREFIX = "base_model.model."  # PeftModel's key names (PeftModel.save_pretrained / from_pretrained)
KOHYA_FILE = "lora_kohya.safetensors"  # the kohya export a run writes beside DIFFUSERS_LORA_FILE (lcm.export_formats)
# the LoRA formats our adapter exports to, per family (cmalign export, lcm.export_formats; cmalign/export.py):
# diffusers has no PixArt LoRA loader and kohya's format no PixArt layout
EXPORT_FORMATS = {"sd": ("diffusers", "peft", "kohya"), "sdxl": ("diffusers", "peft", "kohya"), "pixart": ("peft",)}


def adapter_spec(rank: int | None, alpha: float = 8.0, targets=DEFAULT_LORA_TARGETS,
                 init: bool | str = True) -> LoraConfig | None:
    """The LoraConfig of our adapter (None: no adapter of ours, rank None)."""
    if rank is None:
        return None
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)


@contextlib.contextmanager
def only_adapter_active(network: torch.nn.Module, name: str) -> Iterator[None]:
    """Run with only adapter `name` active in every LoRA layer, keeping requires_grad flags as they were
    (peft's set_adapter re-flags trainability) and restoring each layer's active adapters after."""
    layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(layer, list(layer.active_adapters), {p: p.requires_grad for p in layer.parameters()}) for layer in layers]
    for layer in layers:
        layer.set_adapter([name])
    try:
        yield
    finally:
        for layer, active, flags in saved:
            layer.set_adapter(active)
            for param, flag in flags.items():
                param.requires_grad_(flag)


def lora_layout(network: torch.nn.Module, adapter: str) -> dict[str, tuple]:
    """{LoRA parameter name without the adapter name: (shape, scaling)} of one adapter on a network."""
    layout = {}
    for module_name, module in network.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in module.scaling:
            continue
        for name, param in module.named_parameters(recurse=True):
            if f".{adapter}." in f".{name}." and ("lora_A" in name or "lora_B" in name):
                key = f"{module_name}.{name}".replace(f".{adapter}.", ".")
                layout[key] = (tuple(param.shape), float(module.scaling[adapter]))
    return layout


def _compare(ours: dict, landed: dict, extra: list, what: str) -> None:
    """Refuse (one line) unless `landed` holds exactly `ours`' tensors with the same shapes and scales."""
    missing = sorted(set(ours) - set(landed))
    wrong = sorted(k for k in set(ours) & set(landed) if ours[k] != landed[k])
    extra = sorted(set(landed) - set(ours)) + list(extra)
    if missing or wrong or extra:
        example = (missing or wrong or extra)[0]
        raise UserError(
            f"{what}: {len(set(ours) & set(landed)) - len(wrong)} of {len(ours)} tensors land as trained "
            f"({len(missing)} missing, {len(wrong)} with another shape or scale, {len(extra)} unexpected, "
            f"e.g. {example}); not exported")


def check_lora_loads_completely(pipeline_class, network: torch.nn.Module, adapter: str, path: Path,
                                component: str = "unet") -> None:
    """Load a diffusers LoRA file with the stock loader of `pipeline_class` into a weightless (meta-device)
    copy of `network` (its `component`: the UNet, or the transformer of SanaSprintPipeline) and refuse it
    (one-line UserError) unless exactly the tensors of `adapter` land there, with the same shapes and scales.
    Stock loaders only warn about keys they cannot place."""
    path = Path(path)
    loaded = pipeline_class.lora_state_dict(path.parent, weight_name=path.name, return_lora_metadata=True)
    with torch.device("meta"):
        shadow = model_class(network).from_config(network.config)  # not DDP's generated subclass
    try:
        if component == "unet":
            state_dict, alphas, metadata = loaded
            pipeline_class.load_lora_into_unet(state_dict, alphas, shadow, adapter_name="check", metadata=metadata,
                                               low_cpu_mem_usage=True)
        else:  # the transformer loaders (SanaLoraLoaderMixin): no network alphas
            state_dict, metadata = loaded
            pipeline_class.load_lora_into_transformer(state_dict, shadow, adapter_name="check", metadata=metadata,
                                                      low_cpu_mem_usage=True)
    except Exception as exc:  # noqa: BLE001 -- any loader failure means a stock pipeline cannot use the file
        raise UserError(f"the exported LoRA {path} does not load into a stock {pipeline_class.__name__} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    _compare(lora_layout(network, adapter), lora_layout(shadow, "check"), [],
             f"the exported LoRA {path} would load incompletely into a stock {pipeline_class.__name__}")


def check_peft_adapter_loads_completely(network: torch.nn.Module, adapter: str, directory: Path) -> None:
    """Load the peft adapter in `directory` the way PeftModel.from_pretrained does (PeftModel on the config
    from adapter_config.json, then load_peft_weights + set_peft_model_state_dict) into a weightless (meta-device)
    transformer of `network`'s config, and refuse it (one-line UserError) unless exactly the LoRA tensors of
    `adapter` land there, with the same shapes and scales. (PeftModel.from_pretrained only warns about keys it
    cannot place; the values are checked against a real load in tests/test_lcm_dit.py.)"""
    with torch.device("meta"):
        shadow = model_class(network).from_config(network.config)  # not DDP's generated subclass
    try:
        config = LoraConfig.from_pretrained(str(directory))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel(shadow, config, adapter_name="check")
            result = set_peft_model_state_dict(loaded, load_peft_weights(str(directory), device="cpu"),
                                               adapter_name="check")
    except Exception as exc:  # noqa: BLE001 -- any loader failure means a stock pipeline cannot use the files
        raise UserError(f"the exported adapter in {directory} does not load with PeftModel.from_pretrained "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    not_loaded = {k.removeprefix(PEFT_PREFIX).replace(".check.", ".") for k in result.missing_keys}
    landed = {k: v for k, v in lora_layout(loaded.get_base_model(), "check").items() if k not in not_loaded}
    _compare(lora_layout(network, adapter), landed, list(result.unexpected_keys),
             f"the exported adapter in {directory} would load incompletely into a stock PixArtAlphaPipeline's transformer")
