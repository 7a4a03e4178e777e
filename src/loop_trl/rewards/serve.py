"""Serve a reward over HTTP, for rewards that need their own process, machine or Python environment.

    python -m loop_trl.rewards.serve --reward pickscore --port 8000
    python -m loop_trl.rewards.serve --reward my_package.rewards:MyReward --host 0.0.0.0 --token-file token.txt

The trainer side is :class:`loop_trl.rewards.RemoteReward`. The server is a Werkzeug WSGI app:

* ``POST /score`` takes JSON ``{"prompts": [...], "metadata": [...], "images": [base64 PNG, ...]}``
  and answers ``{"rewards": [number or null (NaN)], "metadata": {...}}``;
* ``GET /health`` answers ``{"reward": name}``.

Security: it binds to 127.0.0.1 unless told otherwise, and refuses any other address without a
token; with ``--token-file`` every request needs ``Authorization: Bearer <token>`` (401 otherwise).
Requests over ``--max_request_mb`` get 413, batches over ``--max_batch`` images get 413, images over
``--max_image_megapixels`` (or requests over ``--max_request_megapixels``) get 413, read from the PNG
headers before any pixel is decoded; other formats get 415, malformed payloads 400 with a message.
It decodes PNG images and JSON only: nothing a client sends is unpickled or executed. Reward calls are serialised (one at a time), so any reward is safe to serve
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

__all__ = ["BUILTIN_REWARDS", "BadImage", "decode_image", "decode_images", "encode_image", "load_reward", "make_app",
           "make_server", "main", "png_size"]

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


class BadImage(ValueError):
    """An image a client sent that the server will not decode; ``status`` is the HTTP answer (400, 413, 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header (its IHDR chunk), read without decoding a pixel.

    BadImage 415 for data that is not PNG (BMP, TIFF, JPEG, ...), 400 for a PNG whose header is broken."""
    if raw[:8] != _PNG_SIGNATURE:
        kind = next((name for magic, name in ((b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                                               (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"))
                     if raw.startswith(magic)), "not PNG")
        raise BadImage(f"an image is {kind} data; this server takes PNG images only", 415)
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise BadImage("a PNG image has no IHDR header chunk")
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if width < 1 or height < 1:
        raise BadImage(f"a PNG image declares {width} x {height} pixels")
    return width, height


def decode_images(data: list, *, max_image_megapixels: float = 16, max_request_megapixels: float = 128) -> torch.Tensor:
    """Base64 PNG images to a (B, 3, H, W) fp32 batch in [0, 1], after checking every header first: PNG only,
    at most ``max_image_megapixels`` per image and ``max_request_megapixels`` in all (BadImage 413 naming the
    limit), one size for the batch. Nothing is decoded unless the whole request passes."""
    raws, sizes = [], []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise BadImage(f"image {i} is not a base64 string")
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadImage(f"image {i} is not base64 data ({error})") from error
        try:
            width, height = png_size(raw)
        except BadImage as error:
            raise BadImage(f"image {i}: {error}", error.status) from None
        if width * height > max_image_megapixels * 1e6:
            raise BadImage(f"image {i} is {width} x {height} = {width * height / 1e6:.1f} megapixels; this server takes "
                           f"at most {max_image_megapixels:g} per image (--max_image_megapixels)", 413)
        raws.append(raw)
        sizes.append((width, height))
    total = sum(w * h for w, h in sizes)
    if total > max_request_megapixels * 1e6:
        raise BadImage(f"the request holds {total / 1e6:.1f} megapixels; this server takes at most "
                       f"{max_request_megapixels:g} per request (--max_request_megapixels)", 413)
    if len(set(sizes)) > 1:
        raise BadImage(f"the images have different sizes ({', '.join(f'{w}x{h}' for w, h in sorted(set(sizes)))}); "
                       "send one size per request")
    if not raws:
        return torch.zeros(0, 3, 1, 1)
    return torch.stack([decode_image(raw) for raw in raws])


def decode_image(data: str | bytes) -> torch.Tensor:
    """The inverse of :func:`encode_image` (base64 text, or the PNG bytes): (3, H, W) fp32 in [0, 1]. BadImage for
    anything but a PNG image that decodes to the size its header declares."""
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else data
    except (binascii.Error, ValueError) as error:
        raise BadImage(f"an image is not base64 data ({error})") from error
    width, height = png_size(raw)
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
        raise BadImage(f"an image is not valid PNG data ({type(error).__name__}: {error})") from error
    if image.size != (width, height):
        raise BadImage(f"a PNG image decodes to {image.size} but its header says {(width, height)}")
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


def make_app(reward: Callable, *, token: str | None = None, max_batch: int = 256, max_request_mb: float = 64,
             max_image_megapixels: float = 16, max_request_megapixels: float = 128):
    """The WSGI app serving ``reward``. Every bad input is a 4xx answer naming it (400 malformed, 401 token,
    413 over a limit, 415 not PNG); 500 only when the reward itself raises."""
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
            batch = decode_images(images, max_image_megapixels=max_image_megapixels,
                                  max_request_megapixels=max_request_megapixels)
        except BadImage as error:
            return reply(error.status, {"error": f"bad images: {error}"})
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
                max_batch: int = 256, max_request_mb: float = 64, max_image_megapixels: float = 16,
                max_request_megapixels: float = 128):
    """A threaded Werkzeug server for ``reward`` (``.serve_forever()``, ``.shutdown()``, ``.server_port``).

    Refuses to bind to anything but the loopback address without a token.
    """
    from werkzeug.serving import make_server as werkzeug_server

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"Refusing to serve on {host!r} without a token: anyone who reaches it could use it. "
                         "Pass --token-file (clients send it as a bearer token), or bind to 127.0.0.1.")
    app = make_app(reward, token=token, max_batch=max_batch, max_request_mb=max_request_mb,
                   max_image_megapixels=max_image_megapixels, max_request_megapixels=max_request_megapixels)
    return werkzeug_server(host, port, app, threaded=True)


def main(argv: list[str] | None = None) -> None:
    """The ``python -m loop_trl.rewards.serve`` command: build the reward named by ``--reward`` and serve it."""
    parser = argparse.ArgumentParser(description="Serve a loop-trl reward over HTTP (see loop_trl.rewards.RemoteReward).")
    parser.add_argument("--reward", required=True,
                        help=f"a built-in reward ({', '.join(BUILTIN_REWARDS)}) or module:callable (a class is built without arguments)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --token-file")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--token-file", "--token_file", dest="token_file", default=None,
                        help="file whose first line is the bearer token clients must send")
    parser.add_argument("--max_batch", type=int, default=256, help="most images in one request (413 above)")
    parser.add_argument("--max_request_mb", type=float, default=64, help="largest request body in MiB (413 above)")
    parser.add_argument("--max_image_megapixels", type=float, default=16,
                        help="largest image in megapixels, read from its PNG header before decoding (413 above; "
                             "a 1-bit PNG of a few kB can declare gigabytes of pixels)")
    parser.add_argument("--max_request_megapixels", type=float, default=128,
                        help="most pixels in one request, all images together, in megapixels (413 above)")
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
                             max_request_mb=args.max_request_mb, max_image_megapixels=args.max_image_megapixels,
                             max_request_megapixels=args.max_request_megapixels)
    except ValueError as error:
        parser.error(str(error))
    logger.info(f"Serving {args.reward} on http://{args.host}:{server.server_port} (POST /score, GET /health)"
                f"{' with a bearer token' if token else ''}")
    server.serve_forever()


if __name__ == "__main__":
    main()
