"""Text rendering: does the image show the text the prompt asks for?

The requested text is the part of the prompt inside double quotes (``a shop sign that says
"open late"``). The image is read by RapidOCR (ONNX models shipped inside the ``rapidocr_onnxruntime``
package, so it works offline: ``pip install loop-trl[ocr]``), and the reward is
``1 - min(d, n) / n`` with ``d`` the edit distance between the requested and the recognised text
and ``n`` the requested text's length, both lower-cased and without spaces (OCR often drops or adds
them). Range [0, 1]: 1 when the text is read exactly, 0 when nothing of it is. A prompt without
quoted text gets NaN: the reward cannot score it (with several rewards, the others still do).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

from .jpeg import to_pil_images

__all__ = ["OCRReward", "edit_distance", "requested_text"]

_QUOTED = re.compile(r'"([^"]+)"')


def requested_text(prompt: str) -> str | None:
    """The text inside the prompt's double quotes (several quoted parts are joined by spaces), or None."""
    parts = _QUOTED.findall(prompt)
    return " ".join(parts) if parts else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _normalise(text: str) -> str:
    return "".join(text.lower().split())


class OCRReward:
    """``reward_function`` for text rendering: ``1 - normalised edit distance`` of the requested and read text.

    Args:
        engine: a callable ``engine(image_array) -> (results, elapsed)`` as RapidOCR's, where results
            is a list of ``[box, text, confidence]`` or None; default ``RapidOCR()`` from
            ``rapidocr_onnxruntime``.
        min_confidence: recognised lines below this confidence are ignored.
    """

    def __init__(self, engine: Any = None, min_confidence: float = 0.0):
        if engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as error:
                raise ImportError("OCRReward needs RapidOCR: pip install 'loop-trl[ocr]' "
                                  "(or pip install rapidocr_onnxruntime).") from error
            engine = RapidOCR()
        self.engine, self.min_confidence = engine, min_confidence

    def read(self, image) -> str:
        """The text recognised in one PIL image, lines in reading order (top to bottom, left to right)."""
        results, _ = self.engine(np.asarray(image.convert("RGB")))
        lines = [(box[0][1], box[0][0], text) for box, text, confidence in (results or [])
                 if float(confidence) >= self.min_confidence]
        return " ".join(text for _, _, text in sorted(lines))

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        pil_images = to_pil_images(images)
        if len(pil_images) != len(prompts):
            raise ValueError(f"Got {len(pil_images)} images for {len(prompts)} prompts.")
        scores, recognised = [], []
        for image, prompt in zip(pil_images, prompts):
            target = requested_text(prompt)
            read = self.read(image) if target is not None else ""
            recognised.append(read)
            if target is None or not _normalise(target):
                scores.append(float("nan"))
                continue
            wanted, got = _normalise(target), _normalise(read)
            scores.append(1.0 - min(edit_distance(wanted, got), len(wanted)) / len(wanted))
        return torch.tensor(scores, dtype=torch.float32), {"ocr_text": recognised}
