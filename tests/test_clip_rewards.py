"""CLIPScore and PickScore on a tiny random CLIP built from a config, and several rewards at once."""

import copy
import math

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer
from loop_trl.rewards import CLIPScore, JpegCompressibility, MultiReward, PickScore
from loop_trl.rewards.base import component_metrics
from loop_trl.testing import tiny_clip_tokenizer

PROMPTS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def images(n=3, size=32, seed=0):
    """Images whose pixels are exact 8-bit values, so a PIL round trip is lossless."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float() / 255


def reference_cosine(model, processor, pixels, prompts):
    """Independently: the processor's own preprocessing and the model's towers and projections."""
    from loop_trl.rewards.jpeg import to_pil_images

    inputs = processor(text=prompts, images=to_pil_images(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]).pooler_output)
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_clip_score_is_w_times_the_clamped_cosine(tiny_clip):
    model, processor = tiny_clip
    reward = CLIPScore(model, processor, device="cpu")
    pixels = images()
    scores, metadata = reward(pixels, PROMPTS, [{}] * 3)
    # Hessel et al.'s clipscore.py scores "A photo depicts " + the caption
    expected_cos = reference_cosine(model, processor, pixels, ["A photo depicts " + p for p in PROMPTS])
    _, bare = CLIPScore(model, processor, device="cpu", prefix="")(pixels, PROMPTS, [{}] * 3)
    torch.testing.assert_close(torch.tensor(bare["cosine"]), reference_cosine(model, processor, pixels, PROMPTS),
                               atol=1e-4, rtol=0)
    assert (torch.tensor(bare["cosine"]) - torch.tensor(metadata["cosine"])).abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(metadata["cosine"]), expected_cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, 2.5 * expected_cos.clamp(min=0), atol=2.5e-4, rtol=0)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and (scores >= 0).all()


def test_pick_score_is_the_logit_scale_times_the_cosine(tiny_clip):
    model, processor = tiny_clip
    reward = PickScore(model, processor, device="cpu")
    pixels = images(seed=1)
    scores, _ = reward(pixels, PROMPTS, [{}] * 3)
    expected = model.logit_scale.exp().item() * reference_cosine(model, processor, pixels, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=model.logit_scale.exp().item() * 1e-4, rtol=0)


def test_clip_rewards_batch_order_size_pil_and_dtype(tiny_clip):
    model, processor = tiny_clip
    pixels = images(n=5, size=48, seed=2)  # not the crop size: resized and cropped
    prompts = PROMPTS + ["a cat", "a dog"]
    whole, _ = CLIPScore(model, processor, device="cpu")(pixels, prompts, [{}] * 5)
    in_pairs, _ = CLIPScore(model, processor, device="cpu", batch_size=2)(pixels, prompts, [{}] * 5)
    torch.testing.assert_close(in_pairs, whole, atol=1e-5, rtol=0)
    order = torch.tensor([4, 2, 0, 3, 1])
    permuted, _ = PickScore(model, processor, device="cpu")(pixels[order], [prompts[i] for i in order], [{}] * 5)
    straight, _ = PickScore(model, processor, device="cpu")(pixels, prompts, [{}] * 5)
    torch.testing.assert_close(permuted, straight[order], atol=1e-4, rtol=0)
    from loop_trl.rewards.jpeg import to_pil_images

    from_pil, _ = CLIPScore(model, processor, device="cpu")(to_pil_images(pixels), prompts, [{}] * 5)
    torch.testing.assert_close(from_pil, whole, atol=1e-5, rtol=0)
    low, _ = CLIPScore(copy.deepcopy(model), processor, device="cpu", dtype=torch.bfloat16)(pixels, prompts, [{}] * 5)
    assert low.dtype == torch.float32 and (low - whole).abs().max() < 0.05  # bf16 weights, fp32 scores
    with pytest.raises(ValueError, match="5 images for 2 prompts"):
        CLIPScore(model, processor, device="cpu")(pixels, prompts[:2], [{}] * 2)


def constant(value, name):
    def reward(images, prompts, metadata):
        return torch.full((len(prompts),), value), {"seen": len(prompts)}

    reward.__name__ = name
    return reward


def test_multi_reward_is_the_weighted_nansum_of_its_components():
    def partial(images, prompts, metadata):  # cannot score the first image
        return torch.tensor([float("nan")] + [4.0] * (len(prompts) - 1)), {}

    def nothing(images, prompts, metadata):
        return [float("nan")] * len(prompts), {}

    combined = MultiReward({"a": constant(1.0, "a"), "b": partial}, weights=[2.0, 0.5])
    total, metadata = combined(None, PROMPTS, [{}] * 3)
    torch.testing.assert_close(total, torch.tensor([2.0, 4.0, 4.0], dtype=torch.float64))
    assert set(metadata["rewards"]) == {"a", "b"} and math.isnan(metadata["rewards"]["b"][0])
    assert metadata["components"]["a"] == {"seen": 3}
    assert combined.__name__ == "2 x a + 0.5 x b"
    only_nan, _ = MultiReward([partial, nothing])(None, PROMPTS, [{}] * 3)
    assert math.isnan(only_nan[0]) and only_nan[1] == 4.0  # no component scored image 0: a fault
    assert list(MultiReward([constant(1, "x"), constant(2, "x")]).rewards) == ["x", "x_1"]
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        MultiReward([partial], weights=[1, 2])
    with pytest.raises(ValueError, match="empty"):
        MultiReward([])
    metrics = component_metrics({"b": torch.tensor([float("nan"), 1.0, 3.0])})
    assert metrics == {"rewards/b/mean": 2.0, "rewards/b/std": 1.0, "rewards/b/nan_count": 1}


def test_trainer_takes_several_rewards_and_logs_each(tmp_path, tiny_sd_path):
    config = LOOPConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=8, sample_num_batches_per_epoch=1,
                        train_batch_size=4, mixed_precision="no", output_dir=str(tmp_path / "run"), seed=0,
                        reward_weights=[1.0, 0.5])
    rewards = {"jpeg": JpegCompressibility(), "const": constant(2.0, "const")}
    trainer = LOOPTrainer(config, rewards, ["a red circle", "a blue square"],
                          LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))
    trainer.step(0, 0)
    metrics = trainer.last_metrics
    assert metrics["rewards/const/mean"] == 2.0 and metrics["rewards/const/std"] == 0.0
    assert metrics["train/reward_mean"] == pytest.approx(metrics["rewards/jpeg/mean"] + 1.0, abs=1e-4)
    with pytest.raises(ValueError, match="reward_weights is set but reward_funcs is a single reward"):
        LOOPTrainer(config, JpegCompressibility(), ["a cat"], LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))
    with pytest.raises(ValueError, match="reward_weights must be a list of finite numbers"):
        LOOPConfig(reward_weights="[1, \"x\"]")


def test_async_rewards_give_the_same_run_and_the_same_faults(tmp_path, tiny_sd_path):
    def run(async_rewards, reward=None, **overrides):
        config = LOOPConfig(num_epochs=2, sample_num_steps=2, sample_batch_size=4, sample_num_batches_per_epoch=3,
                            train_batch_size=4, mixed_precision="no", output_dir=str(tmp_path / f"run{async_rewards}"),
                            seed=0, async_reward_computation=async_rewards, max_workers=2, **overrides)
        trainer = LOOPTrainer(config, reward or JpegCompressibility(), ["a red circle", "a blue square"],
                              LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))
        trainer.train()
        return trainer

    in_turn, overlapped = run(False), run(True)
    for a, b in zip(in_turn.trainable_parameters, overlapped.trainable_parameters):
        assert torch.equal(a, b)  # bit-identical weights after two epochs
    assert [m["train/reward_mean"] for m in in_turn.log_history if "train/reward_mean" in m] == \
        [m["train/reward_mean"] for m in overlapped.log_history if "train/reward_mean" in m]

    calls = []

    def fails_on_second_batch(images, prompts, metadata):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("reward server down")
        return torch.zeros(len(prompts)), {}

    with pytest.raises(RuntimeError, match=r"reward_function raised RuntimeError: reward server down \[epoch 0, sampling batch 1"):
        run(True, fails_on_second_batch)


# ---------------------------------------------------------------- HPSv2: an OpenCLIP-format checkpoint
def openclip_state_dict(width=32, layers=2, embed=16, patch=8, image=32, vocab=514, context=77, seed=0):
    """A random CLIP state dict in OpenAI's / OpenCLIP's layout (what HPSv2's checkpoint holds)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
          "visual.positional_embedding": r((image // patch) ** 2 + 1, width), "visual.proj": r(width, embed),
          "token_embedding.weight": r(vocab, width), "positional_embedding": r(context, width),
          "text_projection": r(width, embed), "logit_scale": torch.tensor(math.log(100.0))}
    for name in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(width), r(width)
    for tower in ("visual.transformer", "transformer"):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            sd |= {p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "mlp.c_fc.weight": r(2 * width, width), p + "mlp.c_fc.bias": r(2 * width),
                   p + "mlp.c_proj.weight": r(width, 2 * width), p + "mlp.c_proj.bias": r(width),
                   p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
                   p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width)}
    return sd


def openclip_forward(sd, pixels, tokens, heads=4, layers=2):
    """OpenCLIP's image and text towers written out from the checkpoint (fused q/k/v, x @ proj,
    features at the end-of-text token): the reference that HPSv2's converted model must match."""
    F = torch.nn.functional

    def blocks(x, tower, causal):
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
            h = F.multi_head_attention_forward(
                h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), x.shape[-1], heads, sd[p + "attn.in_proj_weight"],
                sd[p + "attn.in_proj_bias"], None, None, False, 0.0, sd[p + "attn.out_proj.weight"],
                sd[p + "attn.out_proj.bias"], need_weights=False, attn_mask=mask)[0].transpose(0, 1)
            x = x + h
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                             sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x

    width = sd["visual.class_embedding"].shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, width), x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = blocks(x, "visual.transformer", causal=False)
    image = F.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    t = F.layer_norm(blocks(t, "transformer", causal=True), (width,), sd["ln_final.weight"], sd["ln_final.bias"])
    text = t[torch.arange(len(t)), tokens.argmax(dim=-1)] @ sd["text_projection"]
    return F.cosine_similarity(image, text, dim=-1)


def test_hpsv2_loads_an_openclip_checkpoint_and_scores_its_cosine(tmp_path, tiny_clip):
    """HPSv2 converts the OpenCLIP-format checkpoint into a transformers CLIPModel; its score equals
    OpenCLIP's cosine computed directly from the checkpoint's tensors, for a plain and a DDP-saved file."""
    from test_reward_transforms import decoded, letterbox_reference

    from loop_trl.rewards import HPSv2

    model, processor = tiny_clip
    config = copy.deepcopy(model.config)
    config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"  # ViT-H/14's, and the reference's
    sd = openclip_state_dict()
    torch.save({"state_dict": sd}, tmp_path / "hps.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "hps_ddp.pt")
    pixels = torch.cat([decoded(24, 40, seed=3), decoded(24, 40, seed=4)])[:3]  # non-square: letterboxed, not cropped
    tokens = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    expected = openclip_forward(sd, letterbox_reference(pixels, 32), tokens)
    for name in ("hps.pt", "hps_ddp.pt"):
        reward = HPSv2(processor=processor, checkpoint=str(tmp_path / name), config=config, device="cpu")
        scores, metadata = reward(pixels, PROMPTS, [{}] * 3)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
        assert metadata["cosine"] == scores.tolist() and scores.shape == (3,)


def test_hpsv2_refuses_checkpoints_it_cannot_load_safely(tmp_path, tiny_clip):
    from loop_trl.rewards import HPSv2

    model, processor = tiny_clip

    import argparse

    # any object beyond plain tensors and containers: weights_only refuses to build it
    torch.save({"state_dict": openclip_state_dict(), "extra": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        HPSv2(processor=processor, checkpoint=str(tmp_path / "pickled.pt"), config=model.config, device="cpu")
    torch.save({"state_dict": openclip_state_dict(layers=1)}, tmp_path / "short.pt")  # one block fewer
    with pytest.raises(ValueError, match="does not fit"):
        HPSv2(processor=processor, checkpoint=str(tmp_path / "short.pt"), config=model.config, device="cpu")
