"""Which model an lcm run names, read from its configs before any weights load, and the settings that
family runs with.

- `model_family`: sd | sdxl | pixart | sana from the pipeline's model_index.json `_class_name` (and the UNet's
  config.json: an SDXL-class UNet has addition_embed_type text_time); a UNet-only repository, an unsupported
  pipeline and a UNet of the other family are refused in one line.
- `identify`: what makes the model few-step (`distilled_by`) and its kind: an LCM UNet (the UNet config's
  time_cond_proj_dim, the guidance embedding of LCM distillation); a LoRA given with --lcm.lora, by its name
  (Hyper-SD: DDIM trailing, or TCD for the 1-step one; SDXL-Lightning: Euler trailing; TCD; else LCM); another UNet
  given with --lcm.unet (a folder, or a bare .safetensors state dict: SDXL-Lightning's, Euler trailing); a
  LatentConsistencyModelPipeline or an LCM/TCD scheduler saved with the pipeline (e.g. a fused LCM-LoRA); an Euler
  or Euler-ancestral scheduler in trailing spacing (SD-Turbo, SDXL-Turbo: the base models ship leading / PNDM); a
  SanaSprintPipeline. A plain SD-1.5 / SDXL / PixArt-alpha base with none of these is refused by `check_distilled`
  in one line that says what to add, unless lcm.allow_non_distilled is set. "Nstep(s)" in a LoRA's or UNet's
  file name sets the default number of steps.
- `family_defaults`: the settings of that kind of model (guidance, scheduler, batch, dtype, beta, evaluation
  sizes, resolution, VAE checkpointing) as {"field" or "section.field": value}, from DEFAULTS; the presets of
  lcm families hold the same values (tests/test_lcm_families.py checks it).

Only configuration files are read here (diffusers is imported inside the readers, so importing this module
stays light).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmalign.errors import UserError
from cmalign.hub import hub_errors, is_local, offline

# model_index.json _class_name -> family
FAMILIES = {"StableDiffusionPipeline": "sd", "LatentConsistencyModelPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "PixArtAlphaPipeline": "pixart",  # pixart: a transformer (PixArt-LCM), pixart.py
            "SanaSprintPipeline": "sana"}  # sana: SANA-Sprint's transformer (sCM), sana.py
TRANSFORMER_FAMILIES = {"pixart": "PixArtTransformer2DModel", "sana": "SanaTransformer2DModel"}  # no UNet
FEW_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")
# a pipeline shipped with one of these schedulers in trailing spacing is an adversarially distilled one (SD-Turbo:
# Euler, SDXL-Turbo: Euler ancestral, diffusers PR #6121); the base models ship leading spacing (SDXL) or PNDM (SD)
TURBO_SCHEDULERS = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral"}

# --- the defaults table: every lcm run starts from COMMON, its family's and its kind's rows ---------------
COMMON = {"num_steps": 4, "mixed_precision": "bf16", "beta": 0.1, "reward_weights": {"pickscore": 1.0},
          "eval_size": 16, "final_eval_size": 64}
FAMILY_DEFAULTS = {  # per network family: image size and memory
    "sd": {"batch_size": 4, "lcm.resolution": 512, "lcm.vae_checkpointing": False},
    "sdxl": {"batch_size": 2, "lcm.resolution": 1024, "lcm.vae_checkpointing": True},
    "pixart": {"batch_size": 2, "lcm.resolution": 1024, "lcm.vae_checkpointing": True},
    # AutoencoderDC has no gradient checkpointing (its 32x latents are small)
    "sana": {"batch_size": 2, "lcm.resolution": 1024, "lcm.vae_checkpointing": False},
}
KIND_DEFAULTS = {  # per kind of distillation: guidance and chain
    # an LCM UNet embeds w (guidance 8 on its model cards): no classifier-free guidance pass
    "lcm-unet": {"lcm.guidance_scale": 8.0, "lcm.scheduler": "lcm"},
    # a base with an LCM-LoRA: the LCM-LoRA cards sample with guidance 1 to 2; 1 runs no CFG
    "lcm-lora": {"lcm.guidance_scale": 1.0, "lcm.scheduler": "lcm"},
    # TCD-LoRA: its cards sample the TCD chain with guidance 0 and gamma (eta) 0.3
    "tcd-lora": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "tcd", "lcm.tcd_gamma": 0.3},
    # PixArt-LCM: guidance 0 (no CFG, no guidance embedding)
    "pixart-lcm": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "lcm"},
    # the distilled samplers (distilled.py), as their cards sample them: guidance 0 (no CFG) ...
    # SD-Turbo / SDXL-Turbo: 1 step, the shipped Euler (ancestral) scheduler, trailing (its class: ModelInfo.settings)
    "turbo": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "euler", "num_steps": 1},
    # SDXL-Lightning (UNet or LoRA): EulerDiscreteScheduler with trailing spacing; N steps from the file's name
    "lightning-unet": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "euler", "num_steps": 4},
    "lightning-lora": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "euler", "num_steps": 4},
    # Hyper-SD LoRAs: DDIM trailing (2-, 4-, 8-step; the 1-step one TCD with eta 1, the CFG ones guidance 5)
    "hyper-lora": {"lcm.guidance_scale": 0.0, "lcm.scheduler": "ddim_trailing", "num_steps": 4},
    # SANA-Sprint: sCM (TrigFlow) with embedded guidance 4.5, 2 steps
    "sana-sprint": {"lcm.guidance_scale": 4.5, "lcm.scheduler": "scm", "num_steps": 2},
}
# hub ids of the presets, so that their defaults resolve offline before anything is downloaded
KNOWN_MODELS = {"SimianLuo/LCM_Dreamshaper_v7": ("sd", "lcm-unet"),
                "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd", None),
                "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", None), "segmind/SSD-1B": ("sdxl", None),
                "PixArt-alpha/PixArt-LCM-XL-2-1024-MS": ("pixart", "pixart-lcm"),
                "stabilityai/sd-turbo": ("sd", "turbo"), "stabilityai/sdxl-turbo": ("sdxl", "turbo"),
                "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers": ("sana", "sana-sprint"),
                "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers": ("sana", "sana-sprint")}
# what the configs of those would say beyond their kind's row (SDXL-Turbo: 512 px, Euler ancestral)
KNOWN_SETTINGS = {"stabilityai/sdxl-turbo": {"lcm.scheduler": "euler_ancestral", "lcm.resolution": 512}}
# what to add to a plain base, per family
DISTILLED_HINTS = {
    "sd": "--lcm.lora latent-consistency/lcm-lora-sdv1-5 (or --preset sd15-lcm-lora)",
    "sdxl": "--lcm.lora latent-consistency/lcm-lora-sdxl or --lcm.unet latent-consistency/lcm-sdxl "
            "(or --preset sdxl-lcm-lora)",
    "pixart": "--lcm.model PixArt-alpha/PixArt-LCM-XL-2-1024-MS (or --preset pixart-lcm-xl-2-1024)",
    "sana": "--preset sana-sprint-1.6b",
}


@dataclass(frozen=True)
class ModelInfo:
    """What the configs of an lcm run's model say, before any weights load."""

    family: str  # sd | sdxl | pixart
    kind: str | None  # a KIND_DEFAULTS key (lcm-unet, lcm-lora, tcd-lora, turbo, ...); None: not distilled
    distilled_by: str | None  # what makes it a few-step model, in words; None: nothing
    native_resolution: int | None = None  # sample_size x the VAE's downsampling, when the configs say
    settings: dict = field(default_factory=dict)  # beyond the kind's row: the shipped scheduler, steps in a file name


def optional_ref(value: str | None) -> str | None:
    """An optional hub id or path: None, "", "none" and "null" (any case) all mean none."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return value


# --- reading configs ----------------------------------------------------------------------------------
def _read_config(cls_name: str, ref: str, what: str, **kwargs) -> dict:
    import diffusers

    with hub_errors(ref, what):
        return dict(getattr(diffusers, cls_name).load_config(ref, local_files_only=offline(), **kwargs))


def _is_unet_repo(model: str) -> bool:
    try:
        return _read_config("UNet2DConditionModel", model, "UNet").get("_class_name") == "UNet2DConditionModel"
    except Exception:  # noqa: BLE001 -- not a UNet either: the pipeline's own error stands
        return False


def _read_index(model: str) -> dict:
    folder = Path(model).expanduser()
    if is_local(model) and not (folder / "model_index.json").is_file():
        hint = ("; a UNet alone is given with --lcm.unet beside its base pipeline (--lcm.model)"
                if (folder / "config.json").is_file() else "")
        raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json){hint}")
    try:
        return _read_config("DiffusionPipeline", model, "diffusion model")
    except UserError:
        if not is_local(model) and _is_unet_repo(model):  # e.g. latent-consistency/lcm-sdxl
            raise UserError(f"{model} is a UNet, not a diffusers pipeline; give it with --lcm.unet beside "
                            "its base pipeline (--lcm.model)") from None
        raise


def check_unet_family(unet_config, family: str, what: str) -> None:
    sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if sdxl_unet != (family == "sdxl"):
        kind = "an SDXL-class UNet (addition_embed_type text_time)" if sdxl_unet else "an SD-1.5-class UNet"
        raise UserError(f"{what} is {kind}, but the pipeline is of the {family} family "
                        f"({'two text encoders' if family == 'sdxl' else 'one text encoder'})")


def is_unet_file(unet: str | None) -> bool:
    """--lcm.unet names a bare UNet state dict (a .safetensors file, local or owner/repo/FILE on the hub, e.g.
    ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors) rather than a diffusers UNet folder."""
    return bool(unet) and str(unet).endswith(".safetensors")


def _family_of(model: str, index: dict, unet: str | None) -> tuple[str, dict | None]:
    """(family, the UNet's config or None for the transformer families), refusing what the lcm world does not run.
    A bare UNet state dict (--lcm.unet FILE.safetensors) has the pipeline's own UNet config."""
    name = index.get("_class_name")
    family = FAMILIES.get(name)
    if family is None:
        raise UserError(f"{model} is a {name} pipeline; the lcm world runs {', '.join(sorted(FAMILIES))} "
                        "(SD-1.5-, SD-2.1- and SDXL-class UNets, PixArt-alpha and SANA-Sprint transformers)")
    if family in TRANSFORMER_FAMILIES:  # no UNet to read or swap
        if unet:
            raise UserError(f"{model} is a {name} (a transformer); --lcm.unet applies to the UNet families only")
        return family, None
    unet_config = (_read_config("UNet2DConditionModel", unet, "UNet") if unet and not is_unet_file(unet)
                   else _read_config("UNet2DConditionModel", model, "diffusion model", subfolder="unet"))
    check_unet_family(unet_config, family, f"the UNet of {unet or model}")
    return family, unet_config


def model_family(model: str, unet: str | None = None) -> str:
    """sd | sdxl | pixart | sana from the pipeline's own model_index.json (and the UNet's config.json), read before
    any weights load; an unsupported pipeline or a UNet-only repository is refused in one line."""
    return _family_of(model, _read_index(model), optional_ref(unet))[0]


def _native_resolution(model: str, family: str, network_config: dict | None) -> int | None:
    try:
        if network_config is None:
            network_config = _read_config(TRANSFORMER_FAMILIES[family], model, "diffusion model", subfolder="transformer")
        vae = _read_config("AutoencoderKL", model, "diffusion model", subfolder="vae")
        blocks = vae.get("block_out_channels") or vae["encoder_block_out_channels"]  # AutoencoderKL | AutoencoderDC
        return int(network_config["sample_size"]) * 2 ** (len(blocks) - 1)
    except (UserError, KeyError, TypeError):
        return None


def steps_in_name(name: str) -> int | None:
    """N of an "Nstep(s)" file or repo name (sdxl_lightning_4step_lora, Hyper-SDXL-8steps-lora), else None."""
    found = re.search(r"(\d+)[-_]?steps?", name.lower())
    return int(found.group(1)) if found else None


def lora_kind(lora: str, weight_name: str | None = None) -> tuple[str, dict]:
    """(kind, settings beyond the kind's row) of a LoRA from its repo / file name: Hyper-SD, SDXL-Lightning,
    TCD or (anything else) LCM."""
    name = " ".join(n for n in (lora, weight_name) if n).lower()
    steps = steps_in_name(Path(weight_name).name if weight_name else name)
    if "hyper" in name:
        if steps == 1:  # the unified 1-step LoRA: TCD with eta 1 on its card
            return "hyper-lora", {"num_steps": 1, "lcm.scheduler": "tcd", "lcm.tcd_gamma": 1.0}
        settings = {"num_steps": steps} if steps else {}
        return "hyper-lora", {**settings, **({"lcm.guidance_scale": 5.0} if "cfg" in name else {})}
    if "lightning" in name:
        return "lightning-lora", {"num_steps": steps} if steps else {}
    return ("tcd-lora" if "tcd" in name else "lcm-lora"), {}


def _unet_kind(unet: str) -> tuple[str, dict]:
    """A UNet swapped in that is not an LCM one (no time_cond_proj_dim): a distilled UNet run as SDXL-Lightning's
    (Euler, trailing, guidance 0), with N steps when its name says."""
    steps = steps_in_name(Path(unet).name)
    return "lightning-unet", {"num_steps": steps} if steps else {}


def _scheduler_kind(model: str, index: dict) -> tuple[str | None, str | None, dict]:
    """What the pipeline's own scheduler says: TCD, LCM, or a Turbo's Euler (ancestral) in trailing spacing."""
    scheduler = (index.get("scheduler") or [None, None])[-1]
    if scheduler == "TCDScheduler":
        return "tcd-lora", "its TCDScheduler", {}
    if scheduler == "LCMScheduler" or index.get("_class_name") == "LatentConsistencyModelPipeline":
        return "lcm-lora", f"its {scheduler if scheduler == 'LCMScheduler' else index['_class_name']}", {}
    if scheduler in TURBO_SCHEDULERS:
        try:
            spacing = _read_config(scheduler, model, "diffusion model", subfolder="scheduler").get("timestep_spacing")
        except UserError:
            spacing = None
        if spacing == "trailing":
            return "turbo", f"its {scheduler} with trailing spacing (SD-Turbo / SDXL-Turbo)", {
                "lcm.scheduler": TURBO_SCHEDULERS[scheduler]}
    return None, None, {}


def _kind(model: str, index: dict, family: str, unet_config: dict | None, lcm) -> tuple[str | None, str | None, dict]:
    """(kind, what makes the model few-step, settings beyond the kind's row) from its configs and the LoRA / UNet
    named."""
    unet, lora = optional_ref(lcm.unet), optional_ref(lcm.lora)
    if family == "sana":
        return "sana-sprint", "a SanaSprintPipeline (sCM)", {}
    if family == "pixart":
        scheduler = (index.get("scheduler") or [None, None])[-1]
        return ("pixart-lcm", f"its {scheduler}", {}) if scheduler in FEW_STEP_SCHEDULERS else (None, None, {})
    if unet_config.get("time_cond_proj_dim") is not None:
        return "lcm-unet", "an LCM UNet (time_cond_proj_dim)", {}
    if lora:
        kind, settings = lora_kind(lora, optional_ref(lcm.lora_weight_name))
        return kind, f"the LoRA {lora}", settings
    if unet:
        kind, settings = _unet_kind(unet)
        return kind, f"the UNet {unet} (run as SDXL-Lightning's: Euler, trailing)", settings
    return _scheduler_kind(model, index)


def identify(lcm) -> ModelInfo:
    """The model of an lcm config section (model, unet, lora) from its configs alone."""
    model, unet, lora = lcm.model, optional_ref(lcm.unet), optional_ref(lcm.lora)
    index = _read_index(model)
    family, unet_config = _family_of(model, index, unet)
    if family in TRANSFORMER_FAMILIES and lora:
        raise UserError(f"{model} is a {index.get('_class_name')}: --lcm.unet and --lcm.lora apply to the UNet "
                        "families only")
    kind, distilled_by, settings = _kind(model, index, family, unet_config, lcm)
    return ModelInfo(family, kind, distilled_by, _native_resolution(model, family, unet_config), settings)


def check_distilled(info: ModelInfo, lcm) -> None:
    """Refuse (one line) a model that is not a few-step model, unless lcm.allow_non_distilled."""
    if info.kind is not None or lcm.allow_non_distilled:
        return
    what = {"sd": "SD-1.5-class", "sdxl": "SDXL-class", "pixart": "PixArt-alpha"}[info.family]
    raise UserError(
        f"{lcm.model} is a plain {what} model (no LCM UNet with time_cond_proj_dim, no distilled UNet or LoRA (LCM, TCD, "
        "Lightning, Hyper-SD), no LCM/TCD scheduler or Turbo's trailing Euler), so its few-step chain is no consistency "
        f"model; add {DISTILLED_HINTS[info.family]}, or --lcm.allow-non-distilled to run it on purpose")


# --- the defaults -------------------------------------------------------------------------------------
def _guess(lcm) -> ModelInfo | None:
    """The ModelInfo of a known hub id that is not readable here (offline, not downloaded yet)."""
    known = KNOWN_MODELS.get(lcm.model)
    if known is None:
        return None
    family, kind = known
    settings = dict(KNOWN_SETTINGS.get(lcm.model, {}))
    unet, lora = optional_ref(lcm.unet), optional_ref(lcm.lora)
    if unet:
        kind, settings = ("lcm-unet", {}) if not ("lightning" in unet.lower() or is_unet_file(unet)) else _unet_kind(unet)
    elif lora and kind is None:
        kind, settings = lora_kind(lora, optional_ref(lcm.lora_weight_name))
    return ModelInfo(family, kind, None, None, settings)


def family_defaults(lcm) -> dict[str, Any]:
    """{"field" or "section.field": value} of the settings the model of an lcm section runs with: COMMON,
    then its family's row, then its kind's row (a model not distilled gets lcm-lora's: guidance 1, no CFG),
    with the model's native resolution when its configs say and what its configs or file names add (a Turbo's
    shipped scheduler, N of "Nstep"). Reads configs only; a model whose configs are not readable (and not a known
    hub id) gets COMMON alone: loading it reports why."""
    try:
        info = identify(lcm)
    except UserError:
        info = _guess(lcm)
    if info is None:
        return dict(COMMON)
    fallback = {"pixart": "pixart-lcm", "sana": "sana-sprint"}.get(info.family, "lcm-lora")
    out = {**COMMON, **FAMILY_DEFAULTS[info.family], **KIND_DEFAULTS[info.kind or fallback]}
    if info.native_resolution:
        out["lcm.resolution"] = info.native_resolution
    return {**out, **info.settings}
