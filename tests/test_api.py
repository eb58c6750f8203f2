"""The public API and plug-ins: docs/api.md's examples, rewards by import path and entry point,
a third-party world and method from an installed package, the remote (http) reward, config sections."""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
import torch

import cmalign
from cmalign.cli import main
from cmalign.config import TrainConfig, cli_aliases, from_mapping, validate, with_changes
from cmalign.errors import UserError
from helpers import TINY_ARGS, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _env(extra_path=None):
    env = dict(os.environ)
    paths = [str(ROOT / "src")] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def test_public_names_are_exported():
    assert set(cmalign.__all__) >= {"TrainConfig", "train", "Reward", "register_reward", "register_world", "register_method"}
    for name in cmalign.__all__:
        assert getattr(cmalign, name) is not None


def test_docs_api_examples_run(tmp_path):
    """Every python block of docs/api.md, in order, in one fresh interpreter."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    script = tmp_path / "api_examples.py"
    script.write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "runs").iterdir())) >= 4  # each train() call wrote its own run directory


def test_config_sections_aliases_and_typed_yaml():
    cfg = TrainConfig(lcm_model="/m", ppo_epochs=3, digits_resolution=16)
    assert (cfg.lcm.model, cfg.ppo.epochs, cfg.digits.resolution) == ("/m", 3, 16)
    assert TrainConfig().lcm.model != "/m"  # the default section object was not mutated
    assert cli_aliases(["--lcm-model", "X", "--ppo_epochs=2", "--beta", "1"]) == ["--lcm.model", "X", "--ppo.epochs=2", "--beta", "1"]
    nested = from_mapping({"ppo": {"epochs": 4}, "digits_resolution": 16, "lcm.guidance_scale": 3, "beta": 2})
    assert nested.ppo.epochs == 4 and nested.digits.resolution == 16 and nested.lcm.guidance_scale == 3.0 and nested.beta == 2.0
    for bad, words in [({"beta": "high"}, "beta must be a number"), ({"ppo": {"epochs": 1.5}}, "ppo.epochs must be an integer"),
                       ({"nope": 1}, "unknown config key"), ({"ppo.nope": 1}, "unknown config key"),
                       ({"reward_weights": {"proxy": "x"}}, "reward_weights must be")]:
        with pytest.raises(UserError, match=words):
            from_mapping(bad)
    # validate only checks: it never rewrites (ddpo's chain length and draft's beta are the methods' business)
    ddpo = tiny_config(method="ddpo")
    assert validate(ddpo) is ddpo and ddpo.num_steps == 4
    with pytest.raises(UserError, match="draft .* no divergence"):
        validate(tiny_config(method="draft", beta=3.0))
    # a PPO setting does not refuse a ROCM run
    validate(tiny_config(method="rocm", batch_size=1, **{"ppo.minibatches": 2}))
    with pytest.raises(UserError, match="ppo.minibatches"):
        validate(tiny_config(method="rlcm", batch_size=1, **{"ppo.minibatches": 2}))
    for bad, words in [(dict(beta=float("inf")), "beta must be finite"), (dict(reward_scale=float("nan")), "reward_scale must be finite"),
                       (dict(reward_weights={"proxy": float("nan")}), "reward_weights must be finite"),
                       (dict(threads=-1), "threads must be >= 1"), (dict(weight_decay=-0.1), "weight_decay"),
                       (dict(batch_size=10**9), "batch_size"), (dict(reward_paths={"pickscore": "/x"}), "reward_paths names pickscore"),
                       (dict(report_to="nosuchtracker"), "unknown tracker")]:
        with pytest.raises(UserError, match=words):
            validate(tiny_config(**bad))
    assert with_changes(TrainConfig(), **{"ppo.clip": 0.2}).ppo.clip == 0.2


USER_REWARD = """
import torch

def ink(images, prompts):
    return images.mean(dim=(1, 2, 3))

def stars(images, prompts):
    return (images.mean(dim=(1, 2, 3)) * 50).floor()
stars.differentiable = False

def wrong_shape(images, prompts):
    return images.mean(dim=(2, 3))
"""


@pytest.fixture
def user_module(tmp_path):
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / "myscores.py").write_text(USER_REWARD)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("myscores", None)


def test_user_reward_by_import_path_from_the_cli_and_python(user_module, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--reward-weights", "myscores:ink=1.0", "proxy=0.5",
                 "--output-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "reward_myscores:ink" in rows[-1]
    import myscores

    result = cmalign.train(tiny_config(steps=2, output_dir=str(tmp_path / "api")), reward=myscores.ink, progress=False)
    assert result.metrics[-1]["step"] == 2 and "reward" in result.metrics[-1]
    # the run's record names the reward it trained on, so that `cmalign eval --run` scores with it
    assert result.config.reward_weights == {"myscores:ink": 1.0}
    assert "myscores:ink" in (tmp_path / "api" / "config.yaml").read_text()
    # a non-differentiable reward: accepted by a policy-gradient method
    assert main(["train", *TINY_ARGS, "--steps", "1", "--method", "rlcm", "--reward-weights", "myscores:stars=1.0",
                 "--output-dir", str(tmp_path / "pg")]) == 0
    capsys.readouterr()
    for args, words in [(["--reward-weights", "myscores:nothere=1"], "has no attribute"),
                        (["--reward-weights", "nosuchmodule_xyz:f=1"], "cannot import nosuchmodule_xyz"),
                        (["--reward-weights", "myscores:wrong_shape=1"], "returned shape")]:
        code = main(["train", *TINY_ARGS, "--steps", "1", *args, "--output-dir", str(tmp_path / args[1].split(":")[1])])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("cmalign: error:") and words in err[0], err


PLUGIN_WORLD = '''
from dataclasses import dataclass

from cmalign.worlds.digits.world import DigitsWorld


@dataclass
class ShiftedConfig:
    offset: float = 0.0
    """How far the plug-in shifts (a setting only this world has)."""


class ShiftedDigits(DigitsWorld):
    """The digits world under another name: a third-party world is any cmalign.World, with its own settings."""
    name = "shifted"
    config_sections = {"shifted": ShiftedConfig}

    @classmethod
    def from_config(cls, cfg, *args, **kwargs):
        world = super().from_config(cfg, *args, **kwargs)
        world.offset = cfg.shifted.offset
        return world

    def step_metrics(self, images01, prompts):
        return {**super().step_metrics(images01, prompts), "shift_offset": self.offset}
'''

PLUGIN_METHOD = '''
import torch
from cmalign import Method
from cmalign.chain import run_chain

class RewardOnly(Method):
    name = "reward-only"
    needs_differentiable_reward = True

    def step(self, batch, optimizer_step):
        w = self.world
        traj = run_chain(w, w.encode_prompts(batch.prompts), batch.noise(w, self.cfg.num_steps), w.timesteps(self.cfg.num_steps))
        images = w.decode(traj.x0).clamp(0, 1)
        reward = self.reward(images, batch.prompts)
        return {"reward": reward.mean().item(), "grad_norm": optimizer_step(-reward.mean()), "plugin": 1.0}, images.detach()
'''


def _install_plugin_package(site: Path) -> None:
    """A separately installed distribution: its code and a dist-info with entry points on sys.path,
    as pip lays it out in site-packages."""
    pkg = site / "cmalign_plugin_demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "world.py").write_text(PLUGIN_WORLD)
    (pkg / "method.py").write_text(PLUGIN_METHOD)
    (pkg / "scores.py").write_text(USER_REWARD)
    info = site / "cmalign_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmalign-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[cmalign.worlds]\nshifted = cmalign_plugin_demo.world:ShiftedDigits\n\n"
        "[cmalign.methods]\nreward-only = cmalign_plugin_demo.method:RewardOnly\n\n"
        "[cmalign.rewards]\ninkpp = cmalign_plugin_demo.scores:ink\n")


# One fresh interpreter (a start costs seconds of imports) with the plug-in distribution on its path runs the four
# checks through the command line's own entry point, main(argv): train, --help, a bad value, a YAML preset.
PLUGIN_CHECKS = """
import contextlib, io, json, sys
from cmalign.cli import main
from cmalign.config import load_preset

train = json.loads(sys.argv[1])
result = {"train": main(train)}
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["train", "--world", "shifted", "--help"])
    except SystemExit:
        pass
result["help"] = out.getvalue()
with contextlib.redirect_stderr(io.StringIO()) as err:
    result["bad"] = main(train[:-4] + ["--shifted.offset", "far", "--output-dir", "bad"])
result["bad_err"] = err.getvalue()
result["yaml_offset"] = load_preset("cfg.yaml").shifted.offset
print("RESULT " + json.dumps(result))
"""


def test_third_party_world_method_and_reward_through_entry_points(tmp_path):
    site = tmp_path / "site"
    _install_plugin_package(site)
    (tmp_path / "cfg.yaml").write_text("world: shifted\nshifted: {offset: 2}\n")
    run = tmp_path / "run"
    train = ["train", *TINY_ARGS, "--steps", "2", "--world", "shifted", "--method", "reward-only",
             "--reward-weights", "inkpp=1.0", "--shifted.offset", "0.5", "--output-dir", str(run)]
    proc = subprocess.run([sys.executable, "-c", PLUGIN_CHECKS, json.dumps(train)], env=_env(site), capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0 and "RESULT " in proc.stdout, proc.stderr[-2000:]
    got = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert got["train"] == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["plugin"] == 1.0 and "eval_gold" in rows[-1]  # the method's step ran; the world's gold is scored
    assert rows[-1]["shift_offset"] == 0.5  # the plug-in world's own setting, set from the command line, reached it
    assert yaml.safe_load((run / "config.yaml").read_text())["shifted"] == {"offset": 0.5}
    # its flag is documented by its field docstring, and a wrong type is one line that leaves nothing behind
    assert "--shifted.offset" in got["help"] and "a setting only this" in got["help"]
    bad = got["bad_err"].strip().splitlines()
    assert got["bad"] == 2 and len(bad) == 1 and bad[0].startswith("cmalign: error:") and not (tmp_path / "bad").exists()
    # and from YAML
    assert got["yaml_offset"] == 2.0


def test_unknown_world_or_method_is_one_line(capsys, tmp_path):
    for flag, name in (("--world", "nosuchworld"), ("--method", "nosuchmethod")):
        assert main(["train", flag, name, "--output-dir", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cmalign: error: unknown {flag[2:]} {name!r}; available:"), err
    assert not list(tmp_path.iterdir())


class _Scorer(BaseHTTPRequestHandler):
    fail = False

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).fail:
            self.send_response(500)
            self.end_headers()
            return
        scores = [float(len(p)) for p in body["prompts"]]  # depends on what the server received
        out = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    _Scorer.fail = False
    server.shutdown()
    server.server_close()


def test_http_reward_scores_remotely_and_failures_skip_the_step(scorer, tmp_path, capsys):
    from cmalign.rewards.http import HttpReward

    url = f"http://127.0.0.1:{scorer.server_address[1]}/score"
    reward = HttpReward(url, timeout=5, retries=0)
    images = torch.rand(3, 1, 8, 8)
    assert reward(images, ["a", "bb", "ccc"]).tolist() == [1.0, 2.0, 3.0]
    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--method", "rlcm", "--reward-weights", "http=1.0",
                 "--reward-paths", f"http={url}", "http.timeout=5", "http.retries=1", "--output-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] is False and rows[-1]["reward"] > 10  # "a handwritten <digit>" has > 10 characters
    _Scorer.fail = True
    capsys.readouterr()
    code = main(["train", *TINY_ARGS, "--steps", "3", "--method", "rlcm", "--reward-weights", "http=1.0", "--max-bad-steps", "2",
                 "--reward-paths", f"http={url}", "http.retries=0", "--output-dir", str(tmp_path / "failing")])
    err = capsys.readouterr().err
    assert code == 2 and "updates in a row were skipped" in err.strip().splitlines()[-1]
    assert "reward http" in err and "HTTPError" in err
    with pytest.raises(UserError, match="http:// or https://"):
        HttpReward("ftp://x")


def _documented_train_commands():
    """Every `cmalign train ...` line of a fenced code block in README.md and docs/*.md (continuations joined)."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks, current = [], None
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                if current is None:
                    current = [] if line[3:].strip() in ("", "bash", "sh", "console") else False
                else:
                    if current is not False:
                        blocks.append("\n".join(current))
                    current = None
            elif isinstance(current, list):
                current.append(line)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#")[0].strip()
                if "cmalign train" not in line or "..." in line or "[" in line:
                    continue
                out.append((path.name, line[line.index("cmalign train") + len("cmalign train"):].split()))
    return out


def test_every_documented_train_command_still_parses():
    from cmalign.cli import train_arguments

    commands = _documented_train_commands()
    assert len(commands) >= 3
    for where, args in commands:
        cfg, _, _ = train_arguments(args)  # raises UserError on a flag that no longer exists
        assert isinstance(cfg, TrainConfig), (where, args)
    cfg, _, _ = train_arguments(["--lcm-model", "/m", "--guidance-scale", "3", "--ppo-epochs", "1", "--digits-resolution", "16"])
    assert (cfg.lcm.model, cfg.lcm.guidance_scale, cfg.ppo.epochs, cfg.digits.resolution) == ("/m", 3.0, 1, 16)
