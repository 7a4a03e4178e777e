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
    expected_cos = reference_cosine(model, processor, pixels, PROMPTS)
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
    assert metrics["reward_mean"] == pytest.approx(metrics["rewards/jpeg/mean"] + 1.0, abs=1e-4)
    with pytest.raises(ValueError, match="reward_weights is set but reward_function is a single reward"):
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
    assert [m["reward_mean"] for m in in_turn.log_history if "reward_mean" in m] == \
        [m["reward_mean"] for m in overlapped.log_history if "reward_mean" in m]

    calls = []

    def fails_on_second_batch(images, prompts, metadata):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("reward server down")
        return torch.zeros(len(prompts)), {}

    with pytest.raises(RuntimeError, match=r"reward_function raised RuntimeError: reward server down \[epoch 0, sampling batch 1"):
        run(True, fails_on_second_batch)
