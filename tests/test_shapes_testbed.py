"""The shapes testbed's renderer, verifier, splits and evaluation (the trained base model comes later)."""

import numpy as np
import pytest
import torch

from loop_trl import LOOPStableDiffusionPipeline
from loop_trl.testbeds.shapes import (
    FAMILIES,
    HELD_OUT_PAIRS,
    Scene,
    ShapesReward,
    Thing,
    all_prompts,
    detect,
    evaluate,
    heldout_prompts,
    parse_prompt,
    random_scene,
    render,
    score,
    train_prompts,
)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("family", FAMILIES)
def test_verifier_accuracy_on_clean_renders(family, image_size):
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng, family, image_size) for _ in range(150)]
    passed = [score(s.prompt, detect(np.asarray(render(s, image_size))))[1] for s in scenes]
    assert np.mean(passed) >= 0.98


def test_verifier_accuracy_under_pixel_noise():
    rng = np.random.default_rng(2)
    passed = []
    for family in FAMILIES:
        for _ in range(50):
            scene = random_scene(rng, family, 32)
            image = np.asarray(render(scene, 32)).astype(np.float32)
            noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            passed.append(score(scene.prompt, detect(noisy))[1])
    assert np.mean(passed) >= 0.95


def _two(a, b, x_a=8.0, x_b=24.0):
    return Scene("binding", [Thing(a[0], a[1], x_a, 16, 10), Thing(b[0], b[1], x_b, 16, 10)])


def test_verifier_rejects_wrong_binding_count_and_side():
    image = np.asarray(render(_two(("red", "circle"), ("blue", "square")), 32))
    found = detect(image)
    assert sorted((d.color, d.shape) for d in found) == [("blue", "square"), ("red", "circle")]
    assert score("a red circle and a blue square", found) == (1.0, True)
    assert score("a blue circle and a red square", found) == (0.0, False)  # colours swapped: binding fails
    assert score("a red circle and a blue triangle", found) == (0.5, False)
    assert score("a red circle to the left of a blue square", found) == (1.0, True)
    assert score("a blue square to the left of a red circle", found) == (2 / 3, False)
    assert score("two red circles", found) == (0.5, False)
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert score("a red circle", detect(blank)) == (0.0, False)


def test_reward_function_signature_and_metadata():
    scenes = [_two(("green", "triangle"), ("yellow", "square")), Scene("single", [Thing("purple", "circle", 16, 16, 14)])]
    images = torch.stack([torch.from_numpy(np.asarray(render(s, 32))).permute(2, 0, 1).float() / 255 for s in scenes])
    rewards, meta = ShapesReward()(images, ["a green triangle and a yellow square", "a cyan circle"], [{}, {}])
    assert rewards.tolist() == [1.0, 0.0] and meta["strict"].tolist() == [True, False]
    assert meta["family"] == ["binding", "single"]
    with pytest.raises(ValueError, match="not a shapes-testbed prompt"):
        parse_prompt("a photo of a cat")


def test_strict_bonus_weighs_a_full_pass_above_partial_credit():
    image = torch.from_numpy(np.asarray(render(_two(("red", "circle"), ("blue", "square")), 32))).permute(2, 0, 1).float() / 255
    prompts = ["a red circle and a blue square", "a red circle and a blue triangle", "a blue circle and a red square"]
    images = image.expand(3, -1, -1, -1)
    plain, meta = ShapesReward()(images, prompts, [{}] * 3)
    shaped, shaped_meta = ShapesReward(strict_bonus=1.0)(images, prompts, [{}] * 3)
    assert plain.tolist() == meta["score"].tolist() == [1.0, 0.5, 0.0]
    assert shaped.tolist() == [1.0, 0.25, 0.0]  # (score + 1 * strict) / 2
    assert shaped_meta["score"].tolist() == [1.0, 0.5, 0.0] and shaped_meta["strict"].tolist() == [True, False, False]
    assert ShapesReward(strict_bonus=1.0).__name__ == "ShapesReward(strict_bonus=1)"  # what the model card names
    with pytest.raises(ValueError, match="strict_bonus must be >= 0"):
        ShapesReward(strict_bonus=-0.5)


def test_splits_hold_out_pairings():
    train, held = train_prompts(), heldout_prompts()
    everything = all_prompts()
    assert set(train).isdisjoint(p for ps in held.values() for p in ps)
    assert len(train) + sum(map(len, held.values())) == sum(map(len, everything.values()))
    for prompt in train:
        assert not any(f"{c} {s}" in prompt for c, s in HELD_OUT_PAIRS)
    for family, prompts in held.items():
        assert prompts and all(any(f"{c} {s}" in p for c, s in HELD_OUT_PAIRS) for p in prompts), family
    assert heldout_prompts(per_family=3, seed=0) == heldout_prompts(per_family=3, seed=0)


def test_evaluate_reports_per_family_accuracy(tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    prompts = heldout_prompts(per_family=1)
    result = evaluate(policy, prompts, n_per_prompt=2, num_steps=2, seed=0)
    assert set(result) == set(FAMILIES) | {"overall", "overall_sem", "mean_score", "mean_score_sem"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result == evaluate(policy, prompts, n_per_prompt=2, num_steps=2, seed=0)  # fixed seed, same numbers


def test_word_tokenizer_keeps_every_testbed_word_whole():
    from loop_trl.testbeds.shapes.train_base import WORDS, word_tokenizer

    tokenizer = word_tokenizer()
    assert all(len(tokenizer.tokenize(word)) == 1 for word in WORDS)
    for prompts in all_prompts().values():
        for prompt in prompts[:20]:
            assert len(tokenizer.tokenize(prompt)) == len(prompt.split())
    assert len(tokenizer("a red circle to the left of a blue square").input_ids) <= tokenizer.model_max_length
