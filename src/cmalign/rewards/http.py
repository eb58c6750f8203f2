"""A remote reward: score images by POSTing them to a user's scoring server (large judges that do not
fit beside the model). Not differentiable, so policy-gradient methods use it (and ROCM's hybrid
estimator where available).

Protocol (JSON over HTTP POST to the URL given as `--reward-paths http=URL`):
  request   {"prompts": [str, ...], "images": [base64 PNG, ...]}   (8-bit RGB or grayscale PNGs)
  response  {"scores": [float, ...]}                                 (one per image, same order)
Options (`--reward-paths http.timeout=30 http.retries=2`): seconds per attempt and retries after the
first attempt, both bounded. A request that still fails, or an answer that is not one finite score
per image, scores the whole batch NaN: the trainer then skips that update through its non-finite
path (and stops after max_bad_steps in a row), with one warning line saying why.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import sys
import time
import urllib.request

import numpy as np
import torch
from PIL import Image

from cmalign.errors import UserError
from cmalign.rewards.base import Reward, RewardContext, reward_factory

MAX_TIMEOUT, MAX_RETRIES = 600.0, 10
FLOAT32_MAX = float(np.finfo(np.float32).max)


def png_base64(image01: torch.Tensor) -> str:
    """One (C, H, W) image in [0, 1] as a base64 PNG (8-bit, as a server's image decoder expects)."""
    arr = (image01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HttpReward(Reward):
    differentiable = False

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, name: str = "http"):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"reward http: the URL must start with http:// or https://, got {url!r} "
                            "(give it as --reward-paths http=http://HOST:PORT/PATH)")
        if not (0 < timeout <= MAX_TIMEOUT) or not (0 <= retries <= MAX_RETRIES):
            raise UserError(f"reward http: timeout must be in (0, {MAX_TIMEOUT:g}] s and retries in [0, {MAX_RETRIES}], "
                            f"got {timeout:g} and {retries}")
        self.url, self.timeout, self.retries, self.name = url, timeout, retries, name
        self.failures = 0

    def _post(self, body: bytes):
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            answer = json.loads(response.read().decode("utf-8"))
        return answer.get("scores") if isinstance(answer, dict) else None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = json.dumps({"prompts": list(prompts), "images": [png_base64(im) for im in images]}).encode("utf-8")
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            try:
                scores = finite_scores(self._post(body), len(prompts))
                if scores is not None:
                    return torch.tensor(scores, device=images.device)
                problem = f"the answer is not {{\"scores\": [{len(prompts)} finite numbers]}}"
                break  # a well-formed but wrong answer will not improve by asking again
            # every transport and protocol failure: refused connections, timeouts, HTTP errors, bad status lines,
            # truncated bodies (http.client.IncompleteRead), undecodable or too deeply nested JSON
            except (OSError, ValueError, TypeError, RecursionError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"  # one line, whatever the server sent
                if attempt < self.retries:
                    time.sleep(min(0.5 * 2**attempt, 5.0))
        self.failures += 1
        print(f"cmalign: warning: reward http ({self.url}) failed ({problem}); this batch scores NaN and its update "
              "is skipped", file=sys.stderr, flush=True)
        return torch.full((len(prompts),), float("nan"), device=images.device)


def finite_scores(scores, n: int) -> np.ndarray | None:
    """n scores as float32 when each is a JSON number that is finite in float32 (a 400-digit integer, 1e300,
    a string or a boolean is not); else None."""
    if not isinstance(scores, list) or len(scores) != n:
        return None
    out = np.empty(n, dtype=np.float32)
    for i, s in enumerate(scores):
        if not isinstance(s, (int, float)) or isinstance(s, bool):
            return None
        try:
            value = float(s)
        except OverflowError:
            return None
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            return None
        out[i] = value
    return out


def _number(options: dict, key: str, default, kind):
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError:
        raise UserError(f"reward http: option {key} must be a number, got {options[key]!r}") from None


@reward_factory(differentiable=False)
def http_reward(ctx: RewardContext) -> Reward:
    """Scores from a user's server: --reward-paths http=http://127.0.0.1:8000/score."""
    options = dict(ctx.options.get("http", {}))
    unknown = sorted(set(options) - {"path", "timeout", "retries"})
    if unknown:
        raise UserError(f"reward http: unknown option(s) {', '.join(unknown)}; allowed: path (the URL), timeout, retries")
    if "path" not in options:
        raise UserError("reward http needs the server's URL: --reward-paths http=http://HOST:PORT/PATH")
    return HttpReward(options["path"], _number(options, "timeout", 30.0, float), _number(options, "retries", 2, int))
