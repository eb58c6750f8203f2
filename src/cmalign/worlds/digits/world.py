"""The embedded digits world: a class-conditional 8x8 consistency model (LCM parameterisation,
v-prediction on a cosine schedule) with a peft LoRA adapter; prompts name a digit class.

Everything that differs on an N x N grid of digits (worlds/digits/grid.py) is a method here that
GridDigitsWorld overrides: the pretraining recipe, prompts, gold, how an 8x8 reward model scores an
image, the proxy's training pairs, accuracy and diversity."""

from __future__ import annotations

from pathlib import Path

import torch

from cmalign import schedule
from cmalign.chain import DDIMTransition
from cmalign.errors import UserError
from cmalign.worlds.base import World
from cmalign.worlds.digits import cache
from cmalign.worlds.digits.classifier import load_classifier
from cmalign.worlds.digits.config import DigitsConfig
from cmalign.worlds.digits.data import NUM_CLASSES, class_prompt, parse_prompt
from cmalign.worlds.digits.gold import gold_components, gold_score
from cmalign.worlds.digits.nets import add_lora, load_adapter, save_adapter
from cmalign.worlds.digits.pretrain import BETA_SCHEDULE, PREDICTION_TYPE, PretrainConfig, step_overrides
from cmalign.worlds.digits.proxy import build_default_proxy, fit_and_publish, load_proxy, make_gold_pairs

ADAPTER_FILE = "adapter.safetensors"
HELDOUT_PROXY_SEED = 1  # the held-out judge: another seed, hence another pair set and initialisation


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

    # --- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device="cpu", lora: bool = True, transition=None) -> "DigitsWorld":
        """The distilled consistency model, or with a DDIM transition (ddpo) the DDPM teacher it came from."""
        if transition is not None and not isinstance(transition, DDIMTransition):
            raise UserError(f"the digits world cannot sample a {type(transition).__name__} chain")
        lora_args = dict(lora_rank=cfg.lora_rank if lora else None, lora_alpha=cfg.lora_alpha)
        which = "teacher" if transition is not None else "consistency"
        world = cls.from_pretrained(cls.pretrain_config(cfg), device, which=which, **lora_args)
        world.transition = transition
        world.proxy_pairs = cfg.digits.proxy_pairs  # the held-out judge is trained on as many pairs
        return world

    @classmethod
    def prepare(cls, cfg, progress: bool = True) -> None:
        cache.locate(cls.pretrain_config(cfg), True, progress)

    @classmethod
    def pretrain_config(cls, cfg) -> PretrainConfig:
        """The base-model recipe a TrainConfig's digits section asks for."""
        d = cfg.digits
        return cls.pretrain_recipe(d.resolution, d.model_size, d.grid, **step_overrides(d))

    @classmethod
    def pretrain_recipe(cls, resolution: int, model_size: str, grid: int = 1, **steps) -> PretrainConfig:
        """This world's pretraining recipe (`cmalign pretrain digits` and the config's digits section)."""
        return PretrainConfig(resolution=resolution, model_size=model_size, **steps)

    @classmethod
    def from_pretrained(cls, pretrain: PretrainConfig, device="cpu", which: str = "consistency", **lora) -> "DigitsWorld":
        network, folder, info = cache.load_base(pretrain, which)
        world = cls.around(network, pretrain, device, **lora)
        world.base_folder, world.base_manifest, world.pretrain = folder, info, pretrain
        return world

    @classmethod
    def around(cls, network: torch.nn.Module, pretrain: PretrainConfig, device="cpu", **lora) -> "DigitsWorld":
        """This world around a network of the recipe `pretrain`."""
        if pretrain.grid != 1:
            raise UserError(f"a {pretrain.grid}x{pretrain.grid} grid base model belongs to GridDigitsWorld, not {cls.__name__}")
        return cls(network, pretrain.resolution, device, **lora)

    # --- prompts ----------------------------------------------------------------------------------------
    @staticmethod
    def default_prompts() -> tuple[list[str], list[str]]:
        """(train, eval) prompts: all ten classes for both (the classes are the whole task)."""
        prompts = [class_prompt(c) for c in range(NUM_CLASSES)]
        return prompts, prompts

    def check_prompts(self, prompts: list[str]) -> None:
        self.encode_prompts(prompts)  # every prompt must name a digit class

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long, device=self.device)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    # --- scores -----------------------------------------------------------------------------------------
    @property
    def digit_resolution(self) -> int:
        """Side of one digit: the input size of the classifier and the proxy that score this world's images."""
        return self.resolution

    def gold(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The gold preference of each image (B,)."""
        return gold_score(images01, prompts)

    def gold_components(self, images01: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gold and its terms (B,) each, for the encoded prompts `labels`."""
        return gold_components(images01, labels)

    def accuracy(self, classifier: torch.nn.Module, images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """1 where the independent classifier reads the prompted class."""
        return (classifier(images01.float().cpu()).argmax(1) == labels).float()

    def image_reward(self, module: torch.nn.Module) -> torch.nn.Module:
        """A digits reward model (images01, prompts) -> (B,) as the reward of this world's images: itself."""
        return module

    def step_metrics(self, images01, prompts):
        return {"gold": self.gold(images01, prompts).mean().item()}

    pretrain = None  # the base model's PretrainConfig (set by from_pretrained)
    proxy_pairs = 2000

    def eval_metrics(self, images01, prompts):
        """The gold terms, class accuracy under the independent classifier and, for a world built from a
        pretrained base model, the held-out proxy (`heldout_proxy`: another pair set and seed)."""
        labels = self.encode_prompts(prompts).cpu()
        out = self.gold_components(images01, labels)
        classifier = load_classifier(self.digit_resolution)
        with torch.no_grad():
            out["accuracy"] = self.accuracy(classifier, images01, labels)
            judge = self.heldout_proxy()
            if judge is not None:
                out["heldout_proxy"] = judge(images01.float().cpu(), prompts)
        return out

    # --- the proxy and the held-out judge ----------------------------------------------------------------
    def build_proxy(self, folder: Path, num_pairs: int, seed: int, num_steps: int, progress: bool, info: dict) -> None:
        """Fit this base model's proxy on gold-labelled pairs of its samples and publish it into `folder`."""
        if progress:
            print(f"cmalign: training the digits proxy reward on {num_pairs} gold-labelled pairs -> {folder}", flush=True)
        fit_and_publish(folder, lambda n, s: make_gold_pairs(self, n, num_steps, s), self.resolution, num_pairs, seed, info)

    @classmethod
    def heldout_proxy_model(cls, pretrain: PretrainConfig, num_pairs: int, device="cpu") -> torch.nn.Module:
        """The held-out proxy of a base model: the same Bradley–Terry CNN on as many gold-labelled pairs, drawn
        with another seed (another pair set), from the CONSISTENCY model's samples whichever chain a method trains
        (ddpo's teacher included), cached. Scored beside gold and the training proxy in every digits evaluation:
        hacking shows as the training proxy rising while the held-out proxy and gold fall."""
        world = cls.from_pretrained(pretrain, "cpu", which="consistency", lora_rank=None)
        return world.image_reward(load_proxy(build_default_proxy(world, num_pairs, seed=HELDOUT_PROXY_SEED))).to(device)

    def heldout_proxy(self):
        """The held-out judge of this base model (built once and cached), or None for a network that does not
        come from a pretrained base (nothing to key a cache on)."""
        if self.pretrain is None:
            return None
        if getattr(self, "_heldout_proxy", None) is None:
            self._heldout_proxy = type(self).heldout_proxy_model(self.pretrain, self.proxy_pairs)
        return self._heldout_proxy

    # --- the network --------------------------------------------------------------------------------------
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
