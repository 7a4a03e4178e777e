"""The video family (Wan) where it meets diffusers, the rewards and the trackers: released scheduler configs,
non-square frames, Wan 2.2's per-token timesteps, per-frame rewards, and videos in the trackers.

The shared conformance checks (sampling, re-scoring, gradients, the trainer, the adapter in plain
diffusers) run for Wan in tests/test_families.py with the other families.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, WanPipeline

from loop_trl import LOOPConfig, LOOPTrainer, load_policy
from loop_trl.hooks import log_images_hook, write_gif
from loop_trl.rewards import JpegCompressibility, MultiReward, PerFrameReward
from loop_trl.testing import build_tiny_wan, save_tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
KWARGS = dict(num_frames=5, max_sequence_length=16, lora_rank=4)


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "pipeline", "wan")


def _lora_on(policy):
    with torch.no_grad():  # stands in for training: a LoRA that changes the output
        for name, param in policy.trainable_module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return policy


def test_the_released_unipc_scheduler_becomes_euler_steps_on_its_flow_sigmas(wan_path):
    """Wan's checkpoints ship UniPC (a multistep solver, no per-step Gaussian): the policy samples the same
    shifted sigmas with Euler steps, and says so to the model card."""
    policy = load_policy(wan_path, resolution=32, **KWARGS)
    scheduler = policy.pipeline.scheduler
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler and scheduler.config.shift == 3.0
    assert policy.model_card_info()["scheduler_kwargs"] == {"shift": 3.0}
    # the noise levels, written out: the shift s' = 3 s / (1 + 2 s) of a linear schedule from 1 to the shifted 1/1000
    # (what FlowMatchEulerDiscreteScheduler(shift=3) visits, and so what the card's pipeline samples)
    traj = policy.sample(PROMPTS, num_steps=4, guidance_scale=1.0, eta=0.7, generator=torch.Generator().manual_seed(0))
    linear = torch.linspace(1.0, 3 * 0.001 / (1 + 2 * 0.001), 4)
    torch.testing.assert_close(traj.sigmas[0, :4], 3 * linear / (1 + 2 * linear), rtol=0, atol=1e-6)
    assert traj.sigmas[0, -1] == 0

    pipe = WanPipeline.from_pretrained(wan_path)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(TypeError, match="needs a flow-matching scheduler.*DDIMScheduler"):
        LOOPWan(pipe)


def LOOPWan(pipe, **kwargs):
    from loop_trl import LOOPWanPipeline

    return LOOPWanPipeline(pipe, **{**KWARGS, "resolution": 32, **kwargs})


def test_bad_video_settings_are_refused_by_name(wan_path):
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1 .*got 6"):
        load_policy(wan_path, resolution=32, **{**KWARGS, "num_frames": 6})
    with pytest.raises(ValueError, match="width must be a positive multiple of 16 .*got 40"):
        load_policy(wan_path, height=32, width=40, **KWARGS)
    with pytest.raises(ValueError, match="two experts .*pass expert='high_noise' .* or expert='low_noise'"):
        LOOPWan(build_tiny_wan(two_experts=True))
    with pytest.raises(ValueError, match="expert='low_noise' is for Wan 2.2 A14B's two experts"):
        LOOPWan(build_tiny_wan(), expert="low_noise")


def test_non_square_frames_sample_as_the_plain_pipeline_samples(wan_path):
    """32 x 64 frames, with the adapter at alpha != rank: the plain pipeline (the card's scheduler, the same
    initial noise, guidance 3) gives the policy's deterministic video."""
    from loop_trl import LOOPWanPipeline

    policy = _lora_on(load_policy(wan_path, height=32, width=64, lora_alpha=8, **KWARGS))
    traj = policy.sample(PROMPTS, num_steps=3, guidance_scale=3.0, eta=0.7, generator=torch.Generator().manual_seed(0),
                         stochastic_steps=[])
    assert traj.images.shape == (2, 5, 3, 32, 64) and traj.latents.shape == (2, 4, 4, 2, 4, 8)
    assert policy.model_card_info()["extra_call_kwargs"] == {"num_frames": 5, "height": 32, "width": 64}
    folder = os.path.join(os.path.dirname(wan_path), "adapter-nonsquare")
    policy.save_weights(folder)
    pipe = WanPipeline.from_pretrained(wan_path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=pipe.scheduler.config.flow_shift)
    pipe.load_lora_weights(folder)
    theirs = pipe(prompt=PROMPTS, num_frames=5, height=32, width=64, num_inference_steps=3, guidance_scale=3.0,
                  latents=traj.latents[:, 0], output_type="pt", max_sequence_length=16).frames
    torch.testing.assert_close(theirs, traj.images, atol=1e-4, rtol=0)
    assert isinstance(policy, LOOPWanPipeline)


def test_wan22_ti2v_takes_one_timestep_per_token_as_its_pipeline_does(tmp_path):
    """Wan 2.2 TI2V-5B (``expand_timesteps``): per-token timesteps, all equal in text-to-video; the plain
    pipeline's deterministic video is the policy's, and re-scoring is on-policy."""
    pipe = build_tiny_wan()
    pipe.register_to_config(expand_timesteps=True)
    pipe.save_pretrained(tmp_path / "ti2v")
    policy = _lora_on(load_policy(str(tmp_path / "ti2v"), resolution=32, **KWARGS))
    assert policy.pipeline.config.expand_timesteps
    traj = policy.sample(PROMPTS, num_steps=3, guidance_scale=1.0, eta=0.7, generator=torch.Generator().manual_seed(0))
    rescored = torch.stack([policy.log_prob(traj, j) for j in range(3)], dim=1)
    assert (rescored - traj.log_probs).abs().max() < 1e-5
    ode = policy.sample(PROMPTS, num_steps=3, guidance_scale=1.0, eta=0.7, generator=torch.Generator().manual_seed(0),
                        stochastic_steps=[])
    policy.save_weights(str(tmp_path / "adapter"))
    plain = WanPipeline.from_pretrained(str(tmp_path / "ti2v"))
    plain.scheduler = FlowMatchEulerDiscreteScheduler.from_config(plain.scheduler.config, shift=3.0)
    plain.load_lora_weights(str(tmp_path / "adapter"))
    theirs = plain(prompt=PROMPTS, num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
                   latents=ode.latents[:, 0], output_type="pt", max_sequence_length=16).frames
    torch.testing.assert_close(theirs, ode.images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_wan22_a14b_trains_one_expert_and_its_adapter_loads_into_that_expert_in_plain_diffusers(tmp_path, expert):
    """Two experts split at boundary_ratio 0.875: the policy samples with both as WanPipeline does, trains only the
    chosen one on its own steps (the trainer names the range), and the adapter, loaded as the card says
    (load_into_transformer_2 for the low-noise expert, lora_alpha 8 != rank 4), reproduces the policy's video."""
    build_tiny_wan(two_experts=True).save_pretrained(tmp_path / "a14b")
    path = str(tmp_path / "a14b")
    policy = _lora_on(load_policy(path, resolution=32, expert=expert, lora_alpha=8, **KWARGS))
    trained, frozen = ("transformer", "transformer_2") if expert == "high_noise" else ("transformer_2", "transformer")
    assert policy.trainable_module is getattr(policy.pipeline, trained)
    assert not any("lora" in n for n, _ in getattr(policy.pipeline, frozen).named_parameters())
    # 6 shifted steps at timesteps 1000, 923, 819, 668, 432, 9: the high-noise expert denoises the first two
    own_steps = [0, 1] if expert == "high_noise" else [2, 3, 4, 5]
    assert policy.zero_variance_steps(6) == [i for i in range(6) if i not in own_steps]
    traj = policy.sample(PROMPTS, num_steps=6, guidance_scale=3.0, eta=0.7, generator=torch.Generator().manual_seed(0))
    assert (traj.log_probs[:, own_steps] != 0).all() and (traj.log_probs[:, [i for i in range(6) if i not in own_steps]] == 0).all()
    for j in own_steps:  # re-scored on-policy, with gradients to every LoRA matrix of the trained expert
        policy.trainable_module.zero_grad()
        logp = policy.log_prob(traj, j)
        assert (logp - traj.log_probs[:, j]).abs().max() < 1e-5
        logp.sum().backward()
        lora = [p for n, p in policy.trainable_module.named_parameters() if "lora_A" in n]
        assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)

    # a batch whose rows sit on either side of the boundary goes to each row's expert
    other = next(i for i in range(6) if i not in own_steps)
    sigmas = torch.stack([traj.sigmas[0, own_steps[0]], traj.sigmas[1, other]])
    args = (traj.conditioning, traj.negative_conditioning, 3.0)
    with torch.no_grad():
        mixed = policy._velocity(policy.trainable_module, traj.latents[:, 0], sigmas, *args)
        for row in (0, 1):
            alone = policy._velocity(policy.trainable_module, traj.latents[row:row + 1, 0], sigmas[row:row + 1],
                                     *({k: v[row:row + 1] for k, v in c.items()} for c in args[:2]), 3.0)
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-6, rtol=0)

    def trainer(**fields):
        config = LOOPConfig(num_epochs=1, sample_num_steps=6, sample_batch_size=4, num_samples_per_prompt=2, train_batch_size=4,
                            sample_guidance_scale=1.0, mixed_precision="no", output_dir=str(tmp_path / expert), **fields)
        return LOOPTrainer(config, PerFrameReward(JpegCompressibility()), PROMPTS, policy)

    fix = "train_timestep_stop=-4" if expert == "high_noise" else "train_timestep_start=2"
    with pytest.raises(ValueError, match=f"expert this run does not train.*Leave them out with {fix}"):
        trainer()
    frozen_before = {k: v.clone() for k, v in getattr(policy.pipeline, frozen).state_dict().items()}
    run = trainer(**{fix.split("=")[0]: int(fix.split("=")[1])})
    run.step(0, 0)
    assert run.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5
    assert all(torch.equal(v, getattr(policy.pipeline, frozen).state_dict()[k]) for k, v in frozen_before.items())

    ode = policy.sample(PROMPTS, num_steps=6, guidance_scale=3.0, eta=0.7, generator=torch.Generator().manual_seed(1),
                        stochastic_steps=[])
    folder = str(tmp_path / f"adapter-{expert}")
    policy.save_weights(folder)
    load_kwargs = policy.model_card_info().get("lora_load_kwargs", {})
    assert load_kwargs == ({"load_into_transformer_2": True} if expert == "low_noise" else {})
    from loop_trl.hub import make_model_card

    card = make_model_card(base_model=path, reward_name="r", config={}, **policy.model_card_info()).content
    assert f'pipe.load_lora_weights("<this repository or folder>"{", load_into_transformer_2=True" if load_kwargs else ""})' in card
    plain = WanPipeline.from_pretrained(path)
    plain.scheduler = FlowMatchEulerDiscreteScheduler.from_config(plain.scheduler.config, shift=3.0)
    plain.load_lora_weights(folder, **load_kwargs)
    theirs = plain(prompt=PROMPTS, num_frames=5, height=32, width=32, num_inference_steps=6, guidance_scale=3.0,
                   latents=ode.latents[:, 0], output_type="pt", max_sequence_length=16).frames
    torch.testing.assert_close(theirs, ode.images, atol=1e-4, rtol=0)
    # examples/generate.py --expert puts the adapter where the card does
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    try:
        from generate import GenerateArguments, load_pipeline
    finally:
        sys.path.pop(0)
    deployed = load_pipeline(GenerateArguments(base=path, adapter=folder, expert=expert), "cpu", torch.float32)
    assert getattr(getattr(deployed, trained), "peft_config", None) and not getattr(getattr(deployed, frozen), "peft_config", None)
    reloaded = load_policy(path, resolution=32, expert=expert, adapter=folder, **KWARGS)
    again = reloaded.sample(PROMPTS, num_steps=6, guidance_scale=3.0, eta=0.7, generator=torch.Generator().manual_seed(1),
                            stochastic_steps=[])
    torch.testing.assert_close(again.images, ode.images, atol=1e-5, rtol=0)


def test_per_frame_reward_is_the_mean_of_the_image_reward_over_frames():
    """Checked against the image reward called on each frame by itself."""
    reward = JpegCompressibility()
    videos = torch.rand(2, 5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    videos[1] *= 0.2  # a flatter video compresses better
    scores, metadata = PerFrameReward(reward)(videos, PROMPTS, [{}, {}])
    expected = [np.mean([float(reward(videos[b, f:f + 1], [PROMPTS[b]], [{}])[0][0]) for f in range(5)]) for b in range(2)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    assert metadata["frame_rewards"].shape == (2, 5) and scores[1] > scores[0]
    strided, meta = PerFrameReward(reward, frame_stride=2)(videos, PROMPTS, [{}, {}])
    assert meta["frame_rewards"].shape == (2, 3)  # frames 0, 2, 4
    torch.testing.assert_close(meta["frame_rewards"], metadata["frame_rewards"][:, ::2], rtol=0, atol=1e-12)

    def unscorable_second_frame(images, prompts, metadata):
        values = torch.ones(len(images))
        values[1] = float("nan")  # frame 1 of video 0
        return values, None

    nan_scores, _ = PerFrameReward(unscorable_second_frame)(videos, PROMPTS, [{}, {}])
    assert torch.isnan(nan_scores[0]) and nan_scores[1] == 1.0
    with pytest.raises(ValueError, match=r"scores videos, \(B, F, 3, H, W\); got a tensor of shape \(2, 3, 16, 24\)"):
        PerFrameReward(reward)(videos[:, 0], PROMPTS, [{}, {}])
    with pytest.raises(ValueError, match="frame_stride must be a positive integer, got 0"):
        PerFrameReward(reward, frame_stride=0)
    with pytest.raises(ValueError, match="already scores videos"):
        PerFrameReward(PerFrameReward(reward))
    with pytest.raises(ValueError, match=r"\['video'\] score videos and \['image'\] images; wrap the image rewards"):
        MultiReward({"video": PerFrameReward(reward), "image": reward})
    assert MultiReward({"a": PerFrameReward(reward), "b": PerFrameReward(reward)}).accepts_video


def test_the_trainer_refuses_a_reward_that_cannot_take_what_the_policy_samples(wan_path, tiny_sd_path, tmp_path):
    config = LOOPConfig(num_epochs=1, sample_num_steps=3, sample_batch_size=4, num_samples_per_prompt=2, train_batch_size=4,
                        mixed_precision="no", sample_eta=0.7, output_dir=str(tmp_path), seed=0)
    with pytest.raises(TypeError, match=r"samples videos.*JpegCompressibility scores images\. Wrap it as .*PerFrameReward"):
        LOOPTrainer(config, JpegCompressibility(), PROMPTS, load_policy(wan_path, resolution=32, **KWARGS))
    with pytest.raises(TypeError, match="scores videos, and the policy samples images"):
        LOOPTrainer(config, PerFrameReward(JpegCompressibility()), PROMPTS, load_policy(tiny_sd_path))


def test_videos_reach_tensorboard_as_frame_strips_and_gifs_keep_every_frame(tmp_path):
    """Through accelerate's real TensorBoard tracker, read back from the event file."""
    from accelerate.tracking import TensorBoardTracker
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    videos = torch.rand(3, 5, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    tracker = TensorBoardTracker("run", str(tmp_path / "tb"))
    tracker.start()
    log_images_hook(max_images=2)([[videos, ["a", "b", "c"], [{}] * 3, torch.tensor([0.1, 0.2, 0.3]), None]], 7, tracker)
    tracker.finish()
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"images": 0})
    events.Reload()
    [logged] = events.Images("samples")
    # each video one image, its 5 frames in a row (TensorBoard then lays the 2 images side by side)
    assert logged.step == 7 and (logged.width, logged.height) == (2 * 5 * 12, 8)
    strip = np.asarray(Image.open(__import__("io").BytesIO(logged.encoded_image_string)).convert("RGB"))
    expected = (videos[1, 3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # video 1, frame 3
    assert np.abs(strip[:, 60 + 36:60 + 48].astype(int) - expected).max() <= 1

    frames = (videos[0].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    gif = Image.open(write_gif(frames, str(tmp_path / "v.gif"), fps=10))
    assert gif.n_frames == 5 and gif.info["duration"] == 100 and gif.size == (12, 8)
