"""A ``reward_function`` that asks a reward server (``python -m loop_trl.rewards.serve``) for the scores."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np
import torch

from .base import to_image_tensor

__all__ = ["RemoteReward"]


class RemoteReward:
    """Scores images on a reward server: batched, images sent as PNG, timeouts, bounded retries.

    Args:
        url: the server's address, e.g. ``http://127.0.0.1:8000``.
        token: the bearer token the server was started with (``--token-file``), if any.
        batch_size: images per request (the server caps it with ``--max_batch``).
        timeout: seconds to wait for one response.
        max_retries: retries of a request after a connection error, a timeout or a 5xx answer, with
            exponential backoff (``backoff``, ``2 * backoff``, ...). A 4xx answer is not retried.
        backoff: seconds before the first retry.

    Errors name the URL and the HTTP status; the trainer handles them by its ``reward_error``
    setting (stop, or drop the batch's prompt groups and carry on).
    """

    def __init__(self, url: str, *, token: str | None = None, batch_size: int = 64, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 1.0):
        if batch_size < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("batch_size must be >= 1, max_retries >= 0 and timeout > 0.")
        import requests

        self.url, self.token = url.rstrip("/"), token
        self.batch_size, self.timeout, self.max_retries, self.backoff = batch_size, timeout, max_retries, backoff
        self.session = requests.Session()
        self.__name__ = f"RemoteReward({self.url})"

    def _post(self, payload: dict) -> dict:
        import requests

        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body, endpoint = json.dumps(payload), f"{self.url}/score"
        for attempt in range(self.max_retries + 1):
            try:
                response = self.session.post(endpoint, data=body, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return response.json()
                message = _error_message(response)
                if response.status_code < 500:  # the request itself is wrong: retrying cannot help
                    raise ValueError(f"The reward server at {endpoint} answered {response.status_code}: {message}")
                problem = f"status {response.status_code}: {message}"
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise RuntimeError(f"The reward server at {endpoint} failed after {self.max_retries + 1} attempts ({problem}).")

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        from .serve import encode_image

        images = to_image_tensor(images)
        metadata = list(prompt_metadata) if prompt_metadata is not None else [None] * len(prompts)
        try:
            json.dumps(metadata)
        except TypeError as error:
            raise TypeError(f"RemoteReward sends prompt metadata as JSON; this metadata is not JSON-serialisable ({error}).") from error
        rewards, merged = [], {}
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            answer = self._post({"prompts": list(prompts[start:stop]), "metadata": metadata[start:stop],
                                 "images": [encode_image(image) for image in images[start:stop]]})
            rewards.extend(float("nan") if r is None else float(r) for r in answer["rewards"])
            for key, value in (answer.get("metadata") or {}).items():
                if isinstance(value, list):
                    merged.setdefault(key, []).extend(value)
                else:
                    merged[key] = value
        if len(rewards) != len(prompts):
            raise ValueError(f"The reward server at {self.url} returned {len(rewards)} rewards for {len(prompts)} images.")
        return torch.tensor(np.asarray(rewards, dtype=np.float32)), merged


def _error_message(response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:500]
