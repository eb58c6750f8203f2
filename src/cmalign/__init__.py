"""cmalign: align consistency models with human preferences (ROCM and its baselines).

The public API (docs/api.md):

    from cmalign import TrainConfig, train
    result = train(TrainConfig(steps=50), reward=my_reward)   # any (images, prompts) -> (B,) callable
    result.run_dir, result.final_eval, result.metrics

Extension points: `register_reward`, `register_world`, `register_method` (or the entry-point groups
`cmalign.rewards`, `cmalign.worlds`, `cmalign.methods`), with the bases `Reward`, `World`, `Method`.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["Batch", "Method", "Reward", "TrainConfig", "TrainResult", "World", "register_method", "register_reward",
           "register_world", "train"]

_WHERE = {
    "TrainConfig": "cmalign.config", "train": "cmalign.training.trainer", "TrainResult": "cmalign.training.trainer",
    "Reward": "cmalign.rewards.registry", "register_reward": "cmalign.rewards.registry",
    "World": "cmalign.worlds.base", "register_world": "cmalign.worlds.registry",
    "Method": "cmalign.methods.base", "Batch": "cmalign.methods.base", "register_method": "cmalign.methods.registry",
}


def __getattr__(name: str):
    # imported on first use, so that `import cmalign` (and the CLI's --help) stays light
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cmalign' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
