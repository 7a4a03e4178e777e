"""OCRReward for real and offline: RapidOCR reads text drawn by PIL."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from loop_trl.rewards.ocr import OCRReward, edit_distance, requested_text


def sign(text: str, size: int = 256) -> torch.Tensor:
    image = Image.new("RGB", (size, size), "white")
    if text:
        ImageDraw.Draw(image).text((16, size // 2 - 20), text, fill="black", font=ImageFont.load_default(size=34))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_edit_distance_and_requested_text():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == edit_distance("lawn", "flaw") == 2
    assert requested_text('a neon sign that says "open late" at night') == "open late"
    assert requested_text('"hello" and "world"') == "hello world"
    assert requested_text("a cat") is None


@pytest.fixture(scope="module")
def ocr():
    return OCRReward()


def test_the_requested_text_scores_highest(ocr):
    prompts = ['a sign that says "open late"'] * 4 + ["a photo of a cat"]
    images = torch.stack([sign("OPEN LATE"), sign("OPEN LAKE"), sign("CLOSED"), sign(""), sign("OPEN LATE")])
    scores, metadata = ocr(images, prompts, [{}] * 5)
    exact, one_off, other, blank, unscored = scores.tolist()
    assert exact == 1.0 and "open" in metadata["ocr_text"][0].lower()
    assert exact > one_off > other and one_off == pytest.approx(1 - 1 / 8)  # one wrong letter of 8
    assert blank == 0.0 and math.isnan(unscored)  # nothing read; no quoted text to check


def test_scores_do_not_depend_on_batch_order(ocr):
    prompts = ['"hello"', '"world"', '"hello"']
    images = torch.stack([sign("HELLO"), sign("WORLD"), sign("WORLD")])
    scores, _ = ocr(images, prompts, [{}] * 3)
    reordered, _ = ocr(images[[2, 0, 1]], [prompts[i] for i in (2, 0, 1)], [{}] * 3)
    torch.testing.assert_close(reordered, scores[[2, 0, 1]])
    assert scores[0] == 1.0 and scores[1] == 1.0 and scores[2] < 0.5
