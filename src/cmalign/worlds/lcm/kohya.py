"""Kohya-format LoRA export (`cmalign export --format kohya`, `lcm.export_formats`): the single .safetensors
file that kohya's sd-scripts writes and ComfyUI (LoraLoader), AUTOMATIC1111 (<lora:name:1>) and diffusers'
non-diffusers loader read.

Input: the diffusers-format LoRA that cmalign exports (pytorch_lora_weights.safetensors: peft key format
`unet.<module>.lora_A.weight` / `.lora_B.weight`, optionally `text_encoder.` / `text_encoder_2.`, and the peft
LoraConfig of each component in the file's `lora_adapter_metadata`).

Output keys, as sd-scripts' networks/lora.py names them:
- `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a 0-dim float tensor; the layer's
  scale is alpha / rank, so alpha = peft scaling * rank);
- SD-1.x-class UNets: diffusers module names (`lora_unet_down_blocks_0_attentions_0_..._attn1_to_q`), as
  sd-scripts trains SD-1.x on a diffusers-named UNet; the text encoder is `lora_te_text_model_...`;
- SDXL-class UNets (addition_embed_type "text_time"): the original SGM names sd-scripts' sdxl_original_unet
  uses (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1`, `output_blocks_...`,
  resnets as in_layers_2 / emb_layers_1 / out_layers_3 / skip_connection, downsamplers as `op`); the text
  encoders are `lora_te1_...` and `lora_te2_...`.

Key syntax comes from diffusers' own `convert_state_dict_to_kohya`; the diffusers -> SGM block mapping (which
diffusers lacks: it only has the inverse, `_maybe_map_sgm_blocks_to_diffusers`) is `sgm_module_name` here.
Every key is read back through the stock pipeline's own `lora_state_dict` (the non-diffusers path) and must
name the module it came from; otherwise the whole export is refused in one line (`UserError`).
`check_kohya_loads` then loads a written file through `load_lora_weights` into a weightless copy of a stock
pipeline and refuses it unless every LoRA layer lands with the source's tensors and scale.
"""

from __future__ import annotations

import collections
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import ModelMixin, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import (
    convert_state_dict_to_diffusers, convert_state_dict_to_kohya, convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmalign.errors import UserError
from cmalign.worlds.base import model_class

__all__ = [
    "KOHYA_KEY", "check_kohya_loads", "export_kohya", "is_sdxl_unet", "kohya_metadata", "read_diffusers_lora",
    "sgm_module_name", "to_kohya", "write_kohya",
]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
OTHER_FORMATS = "export it in the diffusers (pytorch_lora_weights.safetensors) or peft (adapter folder) format instead"
# every key of a kohya LoRA file written here
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
_SOURCE_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
_CHECK_ADAPTER = "kohya_check"
_NAME_ONLY = torch.empty(0)  # a stand-in tensor where only key conversions run


def is_sdxl_unet(unet_config: Mapping) -> bool:
    """SDXL-class UNet (two text encoders' pooled embedding and time ids): sd-scripts names it in SGM terms."""
    return unet_config.get("addition_embed_type") == "text_time"


def _refuse(key: str, reason: str) -> UserError:
    return UserError(f"cannot write LoRA tensor {key} in kohya format: {reason}; {OTHER_FORMATS}")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"


# --- diffusers UNet module names -> SGM (sd-scripts' sdxl_original_unet) ----------------------------------
_RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_TOP_LEVEL_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2"}


def _layers_per_block(unet_config: Mapping) -> int:
    layers = unet_config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise UserError(f"cannot name an SDXL-class UNet with layers_per_block {list(layers)} in kohya's SGM "
                            f"layout (diffusers' kohya loader assumes one count for every block); {OTHER_FORMATS}")
        layers = layers[0]
    return int(layers)


def sgm_module_name(module: str, unet_config: Mapping) -> str | None:
    """The SGM name (sd-scripts' SDXL UNet, as in sgm's openaimodel.UNetModel) of a diffusers UNet module
    path, e.g. down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in for SDXL's 2 layers per block;
    None where the module has no SGM counterpart that the mapping knows."""
    if module in _TOP_LEVEL_SGM:
        return _TOP_LEVEL_SGM[module]
    lpb = _layers_per_block(unet_config)
    parts = module.split(".")

    def inner(kind: str, rest: list[str]) -> list[str] | None:
        if kind == "resnets":
            if not rest or rest[0] not in _RESNET_SGM or len(rest) != 1:
                return None
            return ["0", *_RESNET_SGM[rest[0]].split(".")]
        return ["1", *rest]  # attentions: Transformer2DModel, same names inside

    if parts[0] == "down_blocks" and len(parts) >= 4 and parts[1].isdigit() and parts[3].isdigit():
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op" if (layer, rest) == (0, ["conv"]) else None
        if kind not in ("resnets", "attentions"):
            return None
        tail = inner(kind, rest)
        return None if tail is None else ".".join(["input_blocks", str(1 + block * (lpb + 1) + layer), *tail])
    if parts[0] == "mid_block" and len(parts) >= 3 and parts[2].isdigit():
        kind, layer, rest = parts[1], int(parts[2]), parts[3:]
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, layer))
        tail = None if index is None else inner(kind, rest)
        return None if tail is None else ".".join(["middle_block", str(index), *tail[1:]])
    if parts[0] == "up_blocks" and len(parts) >= 4 and parts[1].isdigit() and parts[3].isdigit():
        block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            if (layer, rest) != (0, ["conv"]):
                return None
            has_attention = "CrossAttn" in str(unet_config.get("up_block_types", [""] * (block + 1))[block])
            return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attention else 1}.conv"
        if kind not in ("resnets", "attentions"):
            return None
        tail = inner(kind, rest)
        return None if tail is None else ".".join(["output_blocks", str(block * (lpb + 1) + layer), *tail])
    return None


# --- reading cmalign's diffusers export -------------------------------------------------------------------
def read_diffusers_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(state dict, {component: peft LoraConfig dict}) of a diffusers-format LoRA file; the configs come from
    the file's lora_adapter_metadata (written by save_lora_weights(..., unet_lora_adapter_metadata=...))."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the LoRA file {path} ({_first_line(exc)})") from None
    configs: dict[str, dict] = {}
    for flat, value in (json.loads(raw) if raw else {}).items():
        component, _, name = flat.partition(".")
        configs.setdefault(component, {})[name] = value
    return state_dict, configs


def _config_dicts(configs: Mapping | None) -> dict[str, dict]:
    """{component: LoraConfig as a dict} from LoraConfig objects or dicts."""
    return {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in (configs or {}).items()}


def _alpha(module: str, rank: int, config: Mapping | None) -> float:
    """kohya alpha giving the layer peft's scale: alpha_k / rank == scaling (lora_alpha / r, or / sqrt(r))."""
    if not config:
        return float(rank)  # no config: diffusers' and peft's loaders assume lora_alpha = r (scale 1)
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(list(patterns), module), config.get("lora_alpha", rank)))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scaling * rank


def _kohya_module(component: str, module: str, unet_config: Mapping) -> str:
    """The dotted module path whose kohya name diffusers' convert_state_dict_to_kohya then spells."""
    if component == "unet":
        if is_sdxl_unet(unet_config):
            sgm = sgm_module_name(module, unet_config)
            if sgm is None:
                raise _refuse(f"unet.{module}.lora_A.weight",
                              "sd-scripts' SDXL UNet (SGM layout) has no module that diffusers maps back to it")
            return sgm
        return module
    # CLIP text encoders: sd-scripts' names have text_model. (transformers 5 flattens CLIPTextModel)
    return module if module.startswith(("text_model.", "text_projection")) else f"text_model.{module}"


def _modules_of(lora_state_dict: Mapping[str, torch.Tensor], sdxl: bool) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(component, module): {"A": lora_A, "B": lora_B}}, refusing a tensor that is no peft-keyed LoRA weight."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state_dict.items():
        match = _SOURCE_KEY.match(key)
        if match is None:
            reason = ("DoRA magnitude vectors have no kohya LoRA counterpart" if "lora_magnitude_vector" in key else
                      "LoRA biases have no kohya LoRA counterpart" if key.endswith(".bias") else
                      "not a peft-keyed LoRA tensor (<unet|text_encoder|text_encoder_2>.<module>.lora_A/B.weight)")
            raise _refuse(key, reason)
        component, module, ab = match.groups()
        if component == "text_encoder_2" and not sdxl:
            raise _refuse(key, "an SD-1.x-class pipeline has one text encoder")
        modules.setdefault((component, module), {})[ab] = tensor
    if not modules:
        raise UserError("cannot write a kohya LoRA: the state dict holds no LoRA tensors")
    return modules


def to_kohya(
    lora_state_dict: Mapping[str, torch.Tensor],
    *,
    unet_config: Mapping,
    adapter_configs: Mapping[str, Mapping] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert a diffusers-format (peft-keyed) LoRA state dict to kohya's keys and alphas.

    unet_config: the UNet's config (its family decides the naming: SDXL-class -> SGM names, lora_te1/te2).
    adapter_configs: {component: peft LoraConfig as dict} (as `read_diffusers_lora` returns); a component
    without one gets alpha = rank (scale 1), as diffusers' own loader assumes for a file without metadata.
    Refuses (one-line UserError naming the tensor) any tensor that kohya's format cannot hold or that
    diffusers' kohya loader would not map back to the module it came from; nothing partial is returned."""
    unet_config = dict(unet_config)
    sdxl = is_sdxl_unet(unet_config)
    adapter_configs = _config_dicts(adapter_configs)
    modules = _modules_of(lora_state_dict, sdxl)
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}  # kohya module name -> component.module
    for (component, module), pair in modules.items():
        source = f"{component}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise _refuse(f"{source}.lora_{next(iter(pair))}.weight", f"its {missing} is missing")
        down, up = pair["A"], pair["B"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise _refuse(f"{source}.lora_A.weight", f"shapes {tuple(down.shape)} / {tuple(up.shape)} "
                          "are not a linear or conv LoRA pair")
        target = f"{component}.{_kohya_module(component, module, unet_config)}"
        # diffusers' own key syntax (. -> _, lora_down / lora_up); its alpha (= rank) is replaced by ours
        converted = convert_state_dict_to_kohya({f"{target}.lora_A.weight": down.detach().contiguous(),
                                                 f"{target}.lora_B.weight": up.detach().contiguous()})
        name = next(k for k in converted if k.endswith(".lora_down.weight")).partition(".")[0]
        renamed = name
        if not sdxl and name.startswith("lora_te1_"):
            renamed = "lora_te_" + name[len("lora_te1_"):]  # sd-scripts' SD-1.x text encoder prefix
        if renamed in source_of:
            raise _refuse(f"{source}.lora_A.weight", f"its kohya name {renamed} is taken by {source_of[renamed]}")
        source_of[renamed] = source
        out[f"{renamed}.lora_down.weight"] = converted[f"{name}.lora_down.weight"]
        out[f"{renamed}.lora_up.weight"] = converted[f"{name}.lora_up.weight"]
        out[f"{renamed}.alpha"] = torch.tensor(_alpha(module, int(down.shape[0]), adapter_configs.get(component)),
                                               dtype=torch.float32)

    bad = next((k for k in out if not KOHYA_KEY.match(k)), None)
    if bad is not None:
        raise _refuse(f"{source_of.get(bad.partition('.')[0], bad)}.lora_A.weight", f"its kohya key {bad} is malformed")
    _check_read_back(out, source_of, unet_config)
    return out


# --- reading kohya keys back the way a stock diffusers pipeline does -------------------------------------
def _normalise(component: str, module: str) -> str:
    if component != "unet":
        module = module.removeprefix("text_model.")
    return f"{component}.{module}"


def _stock_lora_state_dict(kohya: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """What the stock pipeline's lora_state_dict (its non-diffusers path) makes of kohya keys: SDXL pipelines
    pass their unet_config, so SGM block names are mapped back; SD-1.x pipelines do not."""
    if is_sdxl_unet(unet_config):
        state_dict, _ = StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=FrozenDict(unet_config))
    else:
        state_dict, _ = StableDiffusionPipeline.lora_state_dict(dict(kohya))
    return state_dict


def _to_peft_names(component: str, part: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key conversions of the stock unet / text-encoder loaders, on one component's whole state dict (the
    text-encoder one infers the key format from all keys together)."""
    if component == "unet":
        return dict(part) if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(dict(part))
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(part)))


def _diffusers_read(kohya: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """{component.module.lora_A/B.weight (text_model. dropped): tensor} as a stock pipeline hands kohya's
    tensors to peft."""
    state_dict = _stock_lora_state_dict(kohya, unet_config)
    out = {}
    for component in COMPONENTS:
        part = {k[len(component) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        for key, tensor in (_to_peft_names(component, part) if part else {}).items():
            module, _, ab = key.rpartition(".lora_")
            out[f"{_normalise(component, module)}.lora_{ab}"] = tensor
    return out


def _check_read_back(kohya: Mapping[str, torch.Tensor], source_of: Mapping[str, str], unet_config: Mapping) -> None:
    """Every module's keys, read back through the stock loader's conversions, name the module they came from;
    then the whole file reads back to exactly the source's tensors."""
    old_keys: dict[str, dict[str, tuple[str, str]]] = {c: {} for c in COMPONENTS}  # component: old key -> (source, ab)
    for name, source in source_of.items():
        single = {f"{name}.{s}": kohya[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        try:
            state_dict = _stock_lora_state_dict(single, unet_config)
        except Exception as exc:  # noqa: BLE001 -- the stock loader cannot read it
            raise _refuse(f"{source}.lora_A.weight",
                          f"diffusers' kohya loader cannot read its key {name} ({_first_line(exc)})") from None
        for key in state_dict:
            component = next((c for c in COMPONENTS if key.startswith(f"{c}.")), None)
            if component is None or len(state_dict) != 2:
                raise _refuse(f"{source}.lora_A.weight", f"diffusers' kohya loader reads its key {name} back as {key}")
            old_keys[component][key[len(component) + 1:]] = (source, "B" if key.endswith("up.weight") else "A")
    for component, keys in old_keys.items():
        if not keys:
            continue
        try:
            converted = list(_to_peft_names(component, dict.fromkeys(keys, _NAME_ONLY)))
        except Exception as exc:  # noqa: BLE001
            first = next(iter(keys.values()))[0]
            raise _refuse(f"{first}.lora_A.weight", f"diffusers' {component} loader cannot convert its keys "
                          f"({_first_line(exc)})") from None
        if len(converted) != len(keys):
            first = next(iter(keys.values()))[0]
            raise _refuse(f"{first}.lora_A.weight", f"diffusers' {component} loader merges some of its keys")
        for new, (source, ab) in zip(converted, keys.values()):
            module, _, got_ab = new.rpartition(".lora_")
            back = _normalise(component, module)
            if back != _normalise(*source.split(".", 1)) or not got_ab.startswith(ab):
                raise _refuse(f"{source}.lora_{ab}.weight",
                              f"diffusers' kohya loader reads it back as {back}.lora_{got_ab}")

    expected = {f"{_normalise(*s.split('.', 1))}.lora_{ab}.weight" for s in source_of.values() for ab in "AB"}
    try:
        got = set(_diffusers_read(kohya, unet_config))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot write this LoRA in kohya format: diffusers' kohya loader fails on the whole file "
                        f"({_first_line(exc)}); {OTHER_FORMATS}") from None
    if got != expected:
        lost = sorted(expected - got) or sorted(got - expected)
        raise _refuse(lost[0], f"read back together, {len(expected & got)} of {len(expected)} tensors keep their "
                      "module names in diffusers' kohya loader")


# --- writing ----------------------------------------------------------------------------------------------
def kohya_metadata(kohya_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, str]:
    """sd-scripts' ss_* header fields that UIs display (most common rank and alpha; per-module values are
    in the tensors)."""
    ranks = [int(v.shape[0]) for k, v in kohya_state_dict.items() if k.endswith(".lora_down.weight")]
    alphas = [float(v) for k, v in kohya_state_dict.items() if k.endswith(".alpha")]
    common = lambda xs: collections.Counter(xs).most_common(1)[0][0] if xs else 0  # noqa: E731
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(common(ranks)),
        "ss_network_alpha": f"{common(alphas):g}",
        "ss_base_model_version": "sdxl_base_v1-0" if is_sdxl_unet(unet_config) else "sd_v1",
        "ss_v2": "False",
        "ss_training_comment": "exported by cmalign from a diffusers-format LoRA",
    }


def write_kohya(path: str | Path, kohya_state_dict: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a kohya LoRA .safetensors (string metadata only); returns the path."""
    path = Path(path)
    bad = next((k for k in kohya_state_dict if not KOHYA_KEY.match(k)), None)
    if bad is not None:
        raise UserError(f"not a kohya LoRA key: {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in kohya_state_dict.items()}
    save_file(tensors, str(path), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


# --- verification through the stock loader --------------------------------------------------------------
def _lora_layers(model: torch.nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (lora_A weight, lora_B weight, scaling)} of one adapter (text_model. dropped)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "scaling", {}):
            a = module.lora_A[adapter].weight
            b = module.lora_B[adapter].weight
            layers[name.removeprefix("text_model.")] = (a, b, float(module.scaling[adapter]))
    return layers


def _shadow(module):
    """A weightless (meta-device) model of `module`'s class and config."""
    with torch.device("meta"):
        cls = model_class(module)  # not DDP's generated subclass
        if isinstance(module, ModelMixin):
            return cls.from_config(module.config)  # diffusers models
        return cls(module.config)  # transformers models


def check_kohya_loads(path: str | Path, pipeline, lora_state_dict: Mapping[str, torch.Tensor],
                      adapter_configs: Mapping[str, Mapping] | None = None,
                      expected_kohya: Mapping[str, torch.Tensor] | None = None) -> int:
    """Refuse a kohya file (one-line UserError) unless
    - loaded with `type(pipeline)`'s own load_lora_weights into a weightless (meta-device) copy of `pipeline`,
      every LoRA layer of the diffusers-format `lora_state_dict` lands with the same shapes and scale, and
      nothing else does (stock loaders only warn about, or silently drop, keys they cannot place), its tensors
      as the stock key conversions hand them to peft equal ours; and
    - the file holds exactly `to_kohya`'s tensors and alphas (`expected_kohya`, computed if not given): other
      tools read alpha / rank from the file, and diffusers ignores a per-module alpha of an attention
      projection that differs from the file's most common one (its alpha_pattern keys keep the
      `processor.to_q_lora` spelling), so a file whose modules differ in scale is refused by the first check.
    Returns the number of LoRA layers."""
    path = Path(path)
    configs = _config_dicts(adapter_configs)
    landed = _landed_in_stock(path, pipeline)
    _compare_landed(path, type(pipeline), landed, _expected_layers(lora_state_dict, configs),
                    _diffusers_read(load_file(str(path)), pipeline.unet.config))
    if expected_kohya is None:
        expected_kohya = to_kohya(lora_state_dict, unet_config=pipeline.unet.config, adapter_configs=configs)
    _check_holds(path, expected_kohya)
    return len(landed)


def _landed_in_stock(path: Path, pipeline) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{component.module: (lora_A, lora_B, scale)} of the file loaded with `type(pipeline)`'s own
    load_lora_weights into a weightless copy of `pipeline`."""
    components = dict(pipeline.components)
    for name in COMPONENTS:
        if components.get(name) is not None:
            components[name] = _shadow(components[name])
    cls = type(pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    for flag in ("requires_safety_checker", "add_watermarker"):
        if flag in params:
            kwargs[flag] = False
    shadow = cls(**kwargs)
    try:
        shadow.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=_CHECK_ADAPTER,
                                 low_cpu_mem_usage=True)
    except Exception as exc:  # noqa: BLE001 -- any loader failure means the stock pipeline cannot use the file
        raise UserError(f"the kohya LoRA {path} does not load into a stock {cls.__name__} ({_first_line(exc)}); "
                        f"{OTHER_FORMATS}") from None
    landed = {}
    for component in COMPONENTS:
        model = getattr(shadow, component, None)
        if model is not None:
            landed.update({f"{component}.{m}": v for m, v in _lora_layers(model, _CHECK_ADAPTER).items()})
    return landed


def _expected_layers(lora_state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, dict]) -> dict:
    """{component.module: (lora_A, lora_B, scale)} of the diffusers-format source."""
    expected: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, tensor in lora_state_dict.items():
        match = _SOURCE_KEY.match(key)
        if match and match.group(3) == "A":
            component, module, _ = match.groups()
            up = lora_state_dict[f"{component}.{module}.lora_B.weight"]
            rank = int(tensor.shape[0])
            expected[_normalise(component, module)] = (tensor, up, _alpha(module, rank, configs.get(component)) / rank)
    return expected


def _compare_landed(path: Path, cls, landed: dict, expected: dict, read: dict) -> None:
    """Refuse unless every expected layer landed with its shape and scale and nothing else did; the shadow's
    LoRA tensors stay on the meta device (peft moves them to their base layer's device), so values are
    compared as the same stock conversions hand them to peft (`read`)."""

    def same(key, ours, theirs) -> bool:
        (a, b, s), (la, lb, ls) = ours, theirs
        if la.shape != a.shape or lb.shape != b.shape or not math.isclose(ls, s, rel_tol=1e-6):
            return False
        values = read.get(f"{key}.lora_A.weight"), read.get(f"{key}.lora_B.weight")
        return all(v is not None and torch.equal(v.float(), w.detach().float().cpu()) for v, w in zip(values, (a, b)))

    missing = sorted(set(expected) - set(landed))
    extra = sorted(set(landed) - set(expected))
    wrong = sorted(k for k in set(expected) & set(landed) if not same(k, expected[k], landed[k]))
    if missing or extra or wrong:
        example = (missing or wrong or extra)[0]
        raise UserError(
            f"the kohya LoRA {path} loads incompletely into a stock {cls.__name__}: "
            f"{len(expected) - len(missing) - len(wrong)} of {len(expected)} LoRA layers land as exported "
            f"({len(missing)} missing, {len(wrong)} with other values or scale, {len(extra)} unexpected, "
            f"e.g. {example}); {OTHER_FORMATS}"
        )


def _check_holds(path: Path, expected_kohya: Mapping[str, torch.Tensor]) -> None:
    """Refuse unless the file holds exactly `to_kohya`'s tensors and alphas."""
    written = load_file(str(path))
    differ = sorted({k.partition(".")[0] for k in set(written) ^ set(expected_kohya)}
                    | {k.partition(".")[0] for k in set(written) & set(expected_kohya)
                       if not torch.equal(written[k].float(), expected_kohya[k].detach().float().cpu())})
    if differ:
        example = f"{differ[0]}.alpha" if f"{differ[0]}.alpha" in written else differ[0]
        raise UserError(f"the kohya LoRA {path} does not hold the exported LoRA: {len(differ)} of "
                        f"{len(expected_kohya) // 3} modules differ in tensors or alpha (e.g. {example}); "
                        f"{OTHER_FORMATS}")


def export_kohya(diffusers_lora: str | Path, out: str | Path, pipeline) -> Path:
    """Convert cmalign's diffusers-format LoRA file to a kohya file at `out`, verified against `pipeline`
    (a stock pipeline of the model the LoRA was trained on; only its classes and configs are used). The file
    appears at `out` only once it has been verified to load completely."""
    state_dict, configs = read_diffusers_lora(diffusers_lora)
    kohya = to_kohya(state_dict, unet_config=pipeline.unet.config, adapter_configs=configs)
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial.safetensors")
    write_kohya(partial, kohya, kohya_metadata(kohya, pipeline.unet.config))
    try:
        check_kohya_loads(partial, pipeline, state_dict, configs, expected_kohya=kohya)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return out
