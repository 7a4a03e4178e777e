"""ImageReward on a tiny BLIP built from configs: the released checkpoint's layout loads into transformers'
BLIP modules, and the score equals BLIP's forward pass written out from the checkpoint's tensors."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer

from test_reward_transforms import openai_clip_reference

from loop_trl.rewards import ImageReward
from loop_trl.rewards.image_reward import (SCORE_MEAN, SCORE_STD, ImageRewardModel,
                                           blip_vision_to_transformers)

PROMPTS = ["a red circle", "a blue square on the left", "two green triangles"]
WIDTH, VISION_WIDTH, HEADS, PATCH, SIZE = 32, 48, 4, 8, 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "on", "the", "left",
             "two", "green", "triangles"]
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(vocab))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def configs(vocab_size):
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
                              image_size=SIZE, patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=HEADS, max_position_embeddings=40, encoder_hidden_size=VISION_WIDTH,
                          layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=0, bos_token_id=None,
                          sep_token_id=None)
    return vision, text


def released_layout(vocab_size, layers=2, seed=0):
    """A random state dict with the released checkpoint's key names (BLIP's timm ViT, BLIP's BERT, the head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    v, w = VISION_WIDTH, WIDTH
    sd = {"blip.visual_encoder.cls_token": r(1, 1, v), "blip.visual_encoder.pos_embed": r(1, (SIZE // PATCH) ** 2 + 1, v),
          "blip.visual_encoder.patch_embed.proj.weight": r(v, 3, PATCH, PATCH), "blip.visual_encoder.patch_embed.proj.bias": r(v),
          "blip.visual_encoder.norm.weight": 1 + r(v), "blip.visual_encoder.norm.bias": r(v),
          "blip.text_encoder.embeddings.word_embeddings.weight": r(vocab_size, w),
          "blip.text_encoder.embeddings.position_embeddings.weight": r(40, w),
          "blip.text_encoder.embeddings.LayerNorm.weight": 1 + r(w), "blip.text_encoder.embeddings.LayerNorm.bias": r(w),
          "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
          "blip.vision_proj.weight": r(8, v), "blip.text_proj.weight": r(8, w)}  # in the file, unused by the score
    for i in range(layers):
        p = f"blip.visual_encoder.blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(v), p + "norm1.bias": r(v), p + "attn.qkv.weight": r(3 * v, v),
               p + "attn.qkv.bias": r(3 * v), p + "attn.proj.weight": r(v, v), p + "attn.proj.bias": r(v),
               p + "norm2.weight": 1 + r(v), p + "norm2.bias": r(v), p + "mlp.fc1.weight": r(96, v), p + "mlp.fc1.bias": r(96),
               p + "mlp.fc2.weight": r(v, 96), p + "mlp.fc2.bias": r(v)}
        p = f"blip.text_encoder.encoder.layer.{i}."
        for block, source in (("attention", w), ("crossattention", v)):
            sd |= {p + f"{block}.self.query.weight": r(w, w), p + f"{block}.self.query.bias": r(w),
                   p + f"{block}.self.key.weight": r(w, source), p + f"{block}.self.key.bias": r(w),
                   p + f"{block}.self.value.weight": r(w, source), p + f"{block}.self.value.bias": r(w),
                   p + f"{block}.output.dense.weight": r(w, w), p + f"{block}.output.dense.bias": r(w),
                   p + f"{block}.output.LayerNorm.weight": 1 + r(w), p + f"{block}.output.LayerNorm.bias": r(w)}
        sd |= {p + "intermediate.dense.weight": r(64, w), p + "intermediate.dense.bias": r(64),
               p + "output.dense.weight": r(w, 64), p + "output.dense.bias": r(w),
               p + "output.LayerNorm.weight": 1 + r(w), p + "output.LayerNorm.bias": r(w)}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((w, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"] = r(n_out, n_in), r(n_out)
    return sd


def attention(x, source, sd, p, heads, mask=None):
    """Multi-head attention of x over source with separate q/k/v weights at prefix p (BERT's layout)."""
    q, k, v = (F.linear(t, sd[p + f"{n}.weight"], sd[p + f"{n}.bias"]) for t, n in ((x, "query"), (source, "key"), (source, "value")))
    split = lambda t: t.view(len(t), t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(x.shape[-1] // heads)
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(scores.dtype).min
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)


def blip_reference(sd, pixels, input_ids, attention_mask, layers=2):
    """BLIP's ViT (pre-norm, fused qkv) and BERT with cross-attention (post-norm), then the head and
    ImageReward's standardisation, written out from the released layout."""
    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)  # noqa: E731
    lin = lambda x, p: F.linear(x, sd[p + "weight"], sd[p + "bias"])  # noqa: E731
    e = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[e + "patch_embed.proj.weight"], sd[e + "patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd[e + "cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[e + "pos_embed"]
    for i in range(layers):
        p = f"{e}blocks.{i}."
        h = ln(x, p + "norm1.", 1e-6)
        q, k, v = lin(h, p + "attn.qkv.").view(len(h), h.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(h.shape), p + "attn.proj.")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2.", 1e-6), p + "mlp.fc1.")), p + "mlp.fc2.")
    image = ln(x, e + "norm.", 1e-6)
    t = "blip.text_encoder."
    y = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:input_ids.shape[1]]
    y = ln(y, t + "embeddings.LayerNorm.", 1e-12)
    for i in range(layers):
        p = f"{t}encoder.layer.{i}."
        y = ln(y + lin(attention(y, y, sd, p + "attention.self.", HEADS, attention_mask), p + "attention.output.dense."),
               p + "attention.output.LayerNorm.", 1e-12)
        y = ln(y + lin(attention(y, image, sd, p + "crossattention.self.", HEADS), p + "crossattention.output.dense."),
               p + "crossattention.output.LayerNorm.", 1e-12)
        y = ln(y + lin(F.gelu(lin(y, p + "intermediate.dense.")), p + "output.dense."), p + "output.LayerNorm.", 1e-12)
    z = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{index}.")
    return (z.squeeze(-1) - SCORE_MEAN) / SCORE_STD


def pixels(n=3, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_image_reward_loads_the_released_layout_and_matches_blip_written_out(tmp_path, tokenizer):
    sd = released_layout(len(tokenizer))
    torch.save(sd, tmp_path / "ImageReward.pt")
    model = ImageRewardModel.from_checkpoint(str(tmp_path / "ImageReward.pt"), *configs(len(tokenizer)))
    reward = ImageReward(model, tokenizer, device="cpu")
    images = pixels()[..., :56]  # 40 x 56: the short side resized to the encoder's 32 (the long one truncated), cropped
    images = torch.cat([images, torch.rand(3, 3, 40, 16, generator=torch.Generator().manual_seed(1))], dim=-1)
    scores, _ = reward(images, PROMPTS, [{}] * 3)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = blip_reference(sd, openai_clip_reference(images, SIZE), tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.std() > 0
    # batching, order and a prompt's own image: each score depends on its pair only
    in_pairs, _ = ImageReward(model, tokenizer, device="cpu", batch_size=2)(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(in_pairs, scores, atol=1e-5, rtol=0)
    order = [2, 0, 1]
    permuted, _ = reward(images[order], [PROMPTS[i] for i in order], [{}] * 3)
    torch.testing.assert_close(permuted, scores[order], atol=1e-5, rtol=0)
    half, _ = ImageReward(model, tokenizer, device="cpu", dtype=torch.bfloat16)(images, PROMPTS, [{}] * 3)
    assert half.dtype == torch.float32 and (half - scores).abs().max() < 0.1


def test_image_reward_refuses_unsafe_or_mismatched_checkpoints(tmp_path, tokenizer):
    sd = released_layout(len(tokenizer))
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        ImageRewardModel.from_checkpoint(str(tmp_path / "pickled.pt"), *configs(len(tokenizer)))
    torch.save(released_layout(len(tokenizer), layers=1), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="does not fit"):
        ImageRewardModel.from_checkpoint(str(tmp_path / "short.pt"), *configs(len(tokenizer)))
    with pytest.raises(ValueError, match="Unexpected key"):
        blip_vision_to_transformers({"head.weight": sd["mlp.layers.0.weight"]})
