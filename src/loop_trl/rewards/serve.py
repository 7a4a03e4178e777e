"""Serve a reward over HTTP, for rewards that need their own process, machine or Python environment.

    python -m loop_trl.rewards.serve --reward pickscore --port 8000
    python -m loop_trl.rewards.serve --reward my_package.rewards:MyReward --host 0.0.0.0 --token-file token.txt

The trainer side is :class:`loop_trl.rewards.RemoteReward`. The server is a Werkzeug WSGI app:

* ``POST /score`` takes JSON ``{"prompts": [...], "metadata": [...], "images": [base64 PNG, ...]}``
  and answers ``{"rewards": [number or null (NaN)], "metadata": {...}}``;
* ``GET /health`` answers ``{"reward": name}``.

Security: it binds to 127.0.0.1 unless told otherwise, and refuses any other address without a
token; with ``--token-file`` every request needs ``Authorization: Bearer <token>`` (401 otherwise).
Requests over ``--max_request_mb`` get 413, batches over ``--max_batch`` images get 413, malformed
payloads 400 with a message. It decodes PNG images and JSON only: nothing a client sends is
unpickled or executed. Reward calls are serialised (one at a time), so any reward is safe to serve
to several clients.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import importlib
import io
import json
import logging
import math
import threading
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .base import reward_name

__all__ = ["BUILTIN_REWARDS", "decode_image", "encode_image", "load_reward", "make_app", "make_server", "main"]

logger = logging.getLogger(__name__)


def _builtin(name: str) -> Callable:
    from . import (AestheticReward, CLIPScore, HPSv2, ImageReward, JpegCompressibility, JpegIncompressibility, OCRReward,
                   PickScore)

    return {"jpeg_compressibility": JpegCompressibility, "jpeg_incompressibility": JpegIncompressibility,
            "aesthetic": AestheticReward, "clipscore": CLIPScore, "pickscore": PickScore, "hpsv2": HPSv2,
            "imagereward": ImageReward, "ocr": OCRReward}[name]


BUILTIN_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clipscore", "pickscore", "hpsv2",
                   "imagereward", "ocr")


def load_reward(spec: str) -> Callable:
    """A built-in reward by name, or ``module:attribute`` (a class is instantiated without arguments)."""
    if spec in BUILTIN_REWARDS:
        return _builtin(spec)()
    if ":" not in spec:
        raise ValueError(f"--reward must be one of {', '.join(BUILTIN_REWARDS)} or module:callable, got {spec!r}.")
    module_name, attribute = spec.split(":", 1)
    target = getattr(importlib.import_module(module_name), attribute)
    reward = target() if isinstance(target, type) else target
    if not callable(reward):
        raise TypeError(f"{spec} is not callable: a reward is reward(images, prompts, prompt_metadata).")
    return reward


def encode_image(image: torch.Tensor) -> str:
    """One (3, H, W) image in [0, 1] as base64 PNG (8 bits per channel, lossless for 8-bit images)."""
    array = (image.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> torch.Tensor:
    """The inverse of :func:`encode_image`: (3, H, W) fp32 in [0, 1]. ValueError for anything but an RGB image."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, TypeError) as error:
        raise ValueError(f"an image is not base64 PNG data ({error})") from error
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _json_ready(value: Any) -> Any:
    """Reward metadata as JSON: tensors and arrays become lists, NaN becomes null, unknown objects strings."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def make_app(reward: Callable, *, token: str | None = None, max_batch: int = 256, max_request_mb: float = 64):
    """The WSGI app serving ``reward``."""
    from werkzeug.exceptions import HTTPException
    from werkzeug.wrappers import Request, Response

    lock = threading.Lock()
    name = reward_name(reward)

    def reply(status: int, payload: dict) -> Response:
        return Response(json.dumps(payload), status=status, mimetype="application/json")

    def score(request: Request) -> Response:
        try:
            payload = json.loads(request.get_data(cache=False))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return reply(400, {"error": f"the body is not JSON ({error})"})
        if not isinstance(payload, dict) or not isinstance(payload.get("prompts"), list) or not isinstance(payload.get("images"), list):
            return reply(400, {"error": "expected a JSON object with lists 'prompts' and 'images' (and optional 'metadata')"})
        prompts, images = payload["prompts"], payload["images"]
        metadata = payload.get("metadata") or [None] * len(prompts)
        if not (len(prompts) == len(images) == len(metadata)) or not all(isinstance(p, str) for p in prompts):
            return reply(400, {"error": f"'prompts' (strings), 'images' and 'metadata' must have one entry per image; "
                                        f"got {len(prompts)}, {len(images)} and {len(metadata)}"})
        if len(images) > max_batch:
            return reply(413, {"error": f"{len(images)} images in one request; this server takes at most {max_batch}"})
        try:
            batch = torch.stack([decode_image(data) for data in images]) if images else torch.zeros(0, 3, 1, 1)
        except (ValueError, TypeError, RuntimeError) as error:  # RuntimeError: images of different sizes
            return reply(400, {"error": f"bad images: {error}"})
        with lock:
            rewards, reward_metadata = reward(batch, prompts, metadata)
        values = torch.as_tensor(np.asarray(rewards.detach().cpu() if torch.is_tensor(rewards) else rewards,
                                            dtype=np.float64)).reshape(-1).tolist()
        return reply(200, {"rewards": _json_ready(values), "metadata": _json_ready(reward_metadata or {})})

    @Request.application
    def app(request: Request) -> Response:
        request.max_content_length = int(max_request_mb * 2**20)
        if token is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return reply(401, {"error": "missing or wrong bearer token"})
        try:
            if request.path == "/health" and request.method == "GET":
                return reply(200, {"reward": name})
            if request.path == "/score" and request.method == "POST":
                return score(request)
            return reply(404, {"error": "POST /score or GET /health"})
        except HTTPException as error:  # 413 from max_content_length, ...
            return reply(error.code or 400, {"error": error.description})
        except Exception as error:  # the reward itself failed: the client applies its reward_error policy
            logger.exception("reward failed")
            return reply(500, {"error": f"the reward raised {type(error).__name__}: {error}"})

    return app


def make_server(reward: Callable, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_batch: int = 256, max_request_mb: float = 64):
    """A threaded Werkzeug server for ``reward`` (``.serve_forever()``, ``.shutdown()``, ``.server_port``).

    Refuses to bind to anything but the loopback address without a token.
    """
    from werkzeug.serving import make_server as werkzeug_server

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"Refusing to serve on {host!r} without a token: anyone who reaches it could use it. "
                         "Pass --token-file (clients send it as a bearer token), or bind to 127.0.0.1.")
    app = make_app(reward, token=token, max_batch=max_batch, max_request_mb=max_request_mb)
    return werkzeug_server(host, port, app, threaded=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a loop-trl reward over HTTP (see loop_trl.rewards.RemoteReward).")
    parser.add_argument("--reward", required=True,
                        help=f"a built-in reward ({', '.join(BUILTIN_REWARDS)}) or module:callable (a class is built without arguments)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --token-file")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--token-file", "--token_file", dest="token_file", default=None,
                        help="file whose first line is the bearer token clients must send")
    parser.add_argument("--max_batch", type=int, default=256, help="most images in one request (413 above)")
    parser.add_argument("--max_request_mb", type=float, default=64, help="largest request body in MiB (413 above)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.readline().strip()
        if not token:
            parser.error(f"--token-file {args.token_file} is empty.")
    try:
        server = make_server(load_reward(args.reward), args.host, args.port, token=token, max_batch=args.max_batch,
                             max_request_mb=args.max_request_mb)
    except ValueError as error:
        parser.error(str(error))
    logger.info(f"Serving {args.reward} on http://{args.host}:{server.server_port} (POST /score, GET /health)"
                f"{' with a bearer token' if token else ''}")
    server.serve_forever()


if __name__ == "__main__":
    main()
