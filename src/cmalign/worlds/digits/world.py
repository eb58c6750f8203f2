"""The embedded digits world: a class-conditional 8x8 consistency model (LCM parameterisation,
v-prediction on a cosine schedule) with a peft LoRA adapter; prompts name a digit class."""

from __future__ import annotations

from pathlib import Path

import torch

from cmalign.worlds.digits.config import DigitsConfig
from cmalign import schedule
from cmalign.errors import UserError
from cmalign.worlds.digits import cache as digits_base
from cmalign.worlds.base import World
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt, parse_prompt
from cmalign.worlds.digits.nets import add_lora, load_adapter, save_adapter
from cmalign.worlds.digits.pretrain import BETA_SCHEDULE, PREDICTION_TYPE, PretrainConfig

ADAPTER_FILE = "adapter.safetensors"


class DigitsWorld(World):
    name = "digits"
    config_sections = {"digits": DigitsConfig}
    prediction_type = PREDICTION_TYPE

    def __init__(self, network: torch.nn.Module, resolution: int = 8, device: str | torch.device = "cpu",
                 lora_rank: int | None = 8, lora_alpha: float = 8.0, lora_init: str | bool = True):
        self.network = network.to(device)
        self.device = torch.device(device)
        self.resolution = resolution
        self.latent_shape = (1, resolution, resolution)
        self.alphas_cumprod = schedule.alphas_cumprod(BETA_SCHEDULE).to(self.device)
        self.has_adapter = lora_rank is not None
        if self.has_adapter:
            add_lora(self.network, lora_rank, lora_alpha, init=lora_init)
            self.network.to(device)

    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "DigitsWorld":
        """The distilled consistency model, or with a DDIM transition (ddpo) the DDPM teacher it came from."""
        from cmalign.chain import DDIMTransition
        from cmalign.worlds.digits.pretrain import pretrain_config_for

        if transition is not None and not isinstance(transition, DDIMTransition):
            raise UserError(f"the digits world cannot sample a {type(transition).__name__} chain")
        lora_args = dict(lora_rank=cfg.lora_rank if lora else None, lora_alpha=cfg.lora_alpha)
        which = "teacher" if transition is not None else "consistency"
        world = cls.from_pretrained(pretrain_config_for(cfg), device, which=which, **lora_args)
        world.transition = transition
        world.proxy_pairs = cfg.digits.proxy_pairs  # the held-out judge is trained on as many pairs
        return world

    @classmethod
    def prepare(cls, cfg, progress: bool = True) -> None:
        from cmalign.worlds.digits.pretrain import pretrain_config_for

        digits_base.locate(pretrain_config_for(cfg), True, progress)

    @classmethod
    def from_pretrained(cls, pretrain: PretrainConfig, device="cpu", which: str = "consistency", **lora) -> "DigitsWorld":
        if pretrain.grid > 1 and cls is DigitsWorld:  # compositional digits (worlds/digits_grid.py)
            from cmalign.worlds.digits.grid import GridDigitsWorld

            return GridDigitsWorld.from_pretrained(pretrain, device, which, **lora)
        network, folder, info = digits_base.load_base(pretrain, which)
        world = cls(network, pretrain.resolution, device, **lora)
        world.base_folder, world.base_manifest, world.pretrain = folder, info, pretrain
        return world

    @staticmethod
    def default_prompts() -> tuple[list[str], list[str]]:
        """(train, eval) prompts: all ten classes for both (the classes are the whole task)."""
        prompts = [class_prompt(c) for c in range(NUM_CLASSES)]
        return prompts, prompts

    def check_prompts(self, prompts: list[str]) -> None:
        self.encode_prompts(prompts)  # every prompt must name a digit class

    def step_metrics(self, images01, prompts):
        from cmalign.worlds.digits.gold import gold_score

        return {"gold": gold_score(images01, prompts).mean().item()}

    pretrain = None  # the base model's PretrainConfig (set by from_pretrained)
    proxy_pairs = 2000

    def eval_metrics(self, images01, prompts):
        """The gold terms, class accuracy under the independent classifier and, for a world built from a
        pretrained base model, the held-out proxy (`heldout_proxy`: another pair set and seed)."""
        from cmalign.worlds.digits.classifier import load_classifier
        from cmalign.worlds.digits.gold import gold_components

        labels = self.encode_prompts(prompts).cpu()
        out = gold_components(images01, labels)
        classifier = load_classifier(self.resolution)
        with torch.no_grad():
            out["accuracy"] = (classifier(images01.float().cpu()).argmax(1) == labels).float()
            judge = self.heldout_proxy()
            if judge is not None:
                out["heldout_proxy"] = judge(images01.float().cpu(), prompts)
        return out

    def heldout_proxy(self):
        """The held-out judge of this base model (built once and cached), or None for a network that does not
        come from a pretrained base (nothing to key a cache on)."""
        if self.pretrain is None:
            return None
        if getattr(self, "_heldout_proxy", None) is None:
            from cmalign.worlds.digits.rewards import heldout_proxy_model

            self._heldout_proxy = heldout_proxy_model(self.pretrain, self.proxy_pairs)
        return self._heldout_proxy

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def model_output(self, x: torch.Tensor, timestep: int, cond: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)
        return self.network(x, t, class_labels=cond).sample

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0 + 1) / 2

    def save_adapter(self, directory: Path) -> None:
        save_adapter(self.network, Path(directory) / ADAPTER_FILE)

    def load_adapter(self, directory: Path) -> None:
        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise UserError(f"no digits adapter at {path}")
        try:
            load_adapter(self.network, path)
        except Exception as exc:
            raise UserError(f"adapter file {path} is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
