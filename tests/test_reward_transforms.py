"""The reward models' image transforms against their authors' definitions, written out independently.

The references (read, not copied): OpenAI CLIP's ``_transform`` as ImageReward's ``ImageReward.py``
and Hessel et al.'s ``clipscore.py`` apply it to 8-bit PIL images (torchvision ``Resize(n)`` on the
short side with the long side truncated, ``CenterCrop`` with rounded offsets, ``ToTensor``,
``Normalize``); and OpenCLIP's ``ResizeMaxSize`` as HPSv2's ``img_score.py`` uses it
(``light_augmentation=True``: the longest side to 224 on the float tensor, sides rounded, black
padding, no clamp). Every size here is non-square or not the model's size, where crop, letterbox
and rounding rules part.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from loop_trl.rewards.base import clip_preprocess, letterbox_preprocess

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(36, 91), (91, 36), (40, 56), (57, 33), (48, 48), (20, 28)]


def decoded(height, width, seed=0):
    """What a VAE hands the reward: floats in [0, 1] with values between the 8-bit levels, a few out of range."""
    return (torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 1.02 - 0.01)


def as_pil(images):
    """diffusers' numpy_to_pil: (x * 255).round() as uint8, after clipping to [0, 1]."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def to_tensor_normalized(image):
    """torchvision's ToTensor then Normalize, written out."""
    x = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def openai_clip_reference(images, size, long_side=int):
    """Resize(size, BICUBIC) -> CenterCrop(size) -> ToTensor -> Normalize on each PIL image."""
    out = []
    for image in as_pil(images):
        w, h = image.size
        if w <= h:
            new_w, new_h = size, long_side(size * h / w)
        else:
            new_w, new_h = long_side(size * w / h), size
        image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        out.append(to_tensor_normalized(image.crop((left, top, left + size, top + size))))
    return torch.stack(out)


def letterbox_reference(images, size):
    """ToTensor of the 8-bit image; the longest side scaled to size (sides rounded, bicubic, antialiased, on
    floats); pasted centred on a black square canvas (the odd pixel to the right or bottom); Normalize."""
    out = []
    for image in as_pil(images):
        x = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        new_h, new_w = round(h * scale), round(w * scale)
        x = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False,
                                            antialias=True)[0]
        canvas = torch.zeros(3, size, size)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas[:, top:top + new_h, left:left + new_w] = x
        out.append((canvas - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
    return torch.stack(out)


@pytest.mark.parametrize("height, width", SIZES)
def test_openai_clip_transform_as_imagereward_and_clipscore_apply_it(height, width):
    images = decoded(height, width)
    torch.testing.assert_close(clip_preprocess(images, 24, MEAN, STD), openai_clip_reference(images, 24), atol=1e-6, rtol=0)


def test_the_long_side_is_truncated_and_the_image_read_in_8_bits():
    """36 x 91 at 24: the long side is 24 * 91 / 36 = 60.67 -> 60 (torchvision), not 61 (rounded); the
    resize is PIL's on the 8-bit image, not a float resize that may overshoot [0, 1]."""
    images = decoded(36, 91)
    ours = clip_preprocess(images, 24, MEAN, STD)
    rounded = openai_clip_reference(images, 24, long_side=round)
    assert (ours - rounded).abs().max() > 1e-2  # the rule the reference has, and this test would catch
    lowest, highest = (0 - np.array(MEAN)) / np.array(STD), (1 - np.array(MEAN)) / np.array(STD)
    for c in range(3):  # 8-bit PIL output: every value within the 0..255 range after normalising
        assert ours[:, c].min() >= lowest[c] - 1e-6 and ours[:, c].max() <= highest[c] + 1e-6
    levels = ours * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    torch.testing.assert_close(levels * 255, (levels * 255).round(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("height, width", SIZES + [(24, 40), (33, 50)])
def test_hpsv2_letterbox_as_img_score_applies_it(height, width):
    images = decoded(height, width, seed=1)
    ours = letterbox_preprocess(images, 32, MEAN, STD)
    torch.testing.assert_close(ours, letterbox_reference(images, 32), atol=1e-5, rtol=0)
    if height != width:  # the whole image is kept: the short side's margins are black, not cropped content
        black = -torch.tensor(MEAN) / torch.tensor(STD)
        edge = ours[:, :, 0, :] if height < width else ours[:, :, :, 0]
        torch.testing.assert_close(edge, black[None, :, None].expand_as(edge), atol=1e-6, rtol=0)
