import pickle

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from loop_trl.rewards import AestheticMLP, AestheticReward, AestheticScorer, JpegCompressibility, JpegIncompressibility


def _images():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=g)
    return torch.cat([flat, noise])


def test_jpeg_compressibility_prefers_simple_images():
    rewards, meta = JpegCompressibility()(_images(), ["a", "b"], [{}, {}])
    assert rewards.shape == (2,) and rewards[0] > rewards[1]
    torch.testing.assert_close(rewards, -meta["jpeg_size_kb"])
    inc, _ = JpegIncompressibility()(_images(), ["a", "b"], [{}, {}])
    torch.testing.assert_close(inc, -rewards)


def test_jpeg_rejects_bad_shapes_and_quality():
    with pytest.raises(ValueError, match="shape"):
        JpegCompressibility()(torch.zeros(3, 8, 8), ["a"], [{}])
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """A tiny CLIP vision tower and a random head, saved like the real ones (folder + .pth state dict)."""
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, image_size=32, patch_size=8,
                                                          projection_dim=24))
    clip.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder / "clip")
    head = AestheticMLP(24)
    torch.save(head.state_dict(), folder / "aesthetic-model.pth")
    return folder, clip, head


def test_aesthetic_reward_loads_from_local_paths_and_matches_manual(tiny_aesthetic):
    folder, clip, head = tiny_aesthetic
    reward = AestheticReward(clip_model=str(folder / "clip"), head=str(folder / "aesthetic-model.pth"), device="cpu")
    images = _images()
    scores, _ = reward(images, ["a", "b"], [{}, {}])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # manual: CLIP normalisation at 32 px, L2-normalised projection, MLP
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = clip.eval()(pixel_values=(images - mean) / std).image_embeds
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # the same scorer passed in as modules, and the head from its folder
    scorer = AestheticScorer(clip, head, image_size=32)
    torch.testing.assert_close(AestheticReward(scorer, device="cpu")(images, ["a", "b"], [{}, {}])[0], expected,
                               atol=1e-4, rtol=1e-4)
    from_folder = AestheticReward(clip_model=str(folder / "clip"), head=str(folder), device="cpu")
    torch.testing.assert_close(from_folder(images, ["a", "b"], [{}, {}])[0], scores)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_aesthetic_head_refuses_pickled_code(tiny_aesthetic, tmp_path):
    folder, _, _ = tiny_aesthetic
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"layers.0.weight": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        AestheticReward(clip_model=str(folder / "clip"), head=str(evil), device="cpu")
