import pytest
import torch
from diffusers import DDIMScheduler

from loop_trl import LOOPStableDiffusionPipeline
from loop_trl.sampling import ddim_step_with_logprob


def _scheduler(prediction_type: str, steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_reproduces_diffusers_ddim(prediction_type):
    scheduler = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(1)
    sample, model_output, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    for t in scheduler.timesteps:
        expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        ours, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, noise=noise)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_per_sample_timesteps_match_one_at_a_time():
    scheduler = _scheduler("epsilon")
    g = torch.Generator().manual_seed(2)
    sample, model_output, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    timesteps = scheduler.timesteps[[0, 4, 9]]
    batched, batched_lp = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, 1.0, noise=noise)
    for i, t in enumerate(timesteps):
        single, single_lp = ddim_step_with_logprob(scheduler, model_output[i:i + 1], t, sample[i:i + 1], 1.0, noise=noise[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)
        torch.testing.assert_close(batched_lp[i:i + 1], single_lp)


def test_log_prob_is_the_gaussian_density():
    scheduler = _scheduler("epsilon")
    g = torch.Generator().manual_seed(3)
    sample, model_output, prev = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[3]
    # independent computation: diffusers' mean (zero noise) and DDIM's sigma_t
    mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = scheduler._get_variance(t, prev_t).sqrt()
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
    torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=1e-5)


def test_step_rejects_bad_arguments():
    scheduler = _scheduler("epsilon")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, 0.0)
    with pytest.raises(ValueError, match="at most one"):
        ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, 1.0, noise=x, prev_sample=x)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sd_vpred_path"])
def test_rescoring_a_trajectory_gives_ratio_one(fixture, request):
    policy = LOOPStableDiffusionPipeline.from_pretrained(request.getfixturevalue(fixture))
    traj = policy.sample(["a red circle", "a blue square"], num_steps=6, guidance_scale=4.0, eta=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 7, 4, 16, 16) and traj.log_probs.shape == (2, 6)
    assert traj.images.shape == (2, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    for step in range(traj.num_steps):
        ratio = torch.exp(policy.log_prob(traj, step) - traj.log_probs[:, step])
        torch.testing.assert_close(ratio, torch.ones(2), atol=1e-5, rtol=0)
    mixed = torch.tensor([5, 0])
    torch.testing.assert_close(policy.log_prob(traj, mixed), traj.log_probs[torch.arange(2), mixed], atol=1e-5, rtol=0)


def test_same_generator_seed_gives_same_samples(tiny_sd_path):
    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    kwargs = dict(num_steps=4, guidance_scale=1.0, eta=1.0)
    a = policy.sample(["x"], generator=torch.Generator().manual_seed(5), **kwargs)
    b = policy.sample(["x"], generator=torch.Generator().manual_seed(5), **kwargs)
    c = policy.sample(["x"], generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_sampling_runs_the_unet_in_eval_mode(tiny_sd_path):
    """A UNet with dropout, left in training mode by a training pass, still samples deterministically."""
    from diffusers import UNet2DConditionModel

    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, use_lora=False)
    unet = policy.pipeline.unet
    policy.pipeline.unet = UNet2DConditionModel.from_config({**unet.config, "dropout": 0.5})
    policy.pipeline.unet.load_state_dict(unet.state_dict())
    policy.pipeline.unet.train()
    kwargs = dict(num_steps=4, guidance_scale=1.0, eta=1.0)
    a = policy.sample(["x"], generator=torch.Generator().manual_seed(5), **kwargs)
    b = policy.sample(["x"], generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a.latents, b.latents)


def test_step_std_is_diffusers_variance_and_shrinks_to_the_end():
    from loop_trl.sampling import ddim_step_std

    scheduler = _scheduler("epsilon")
    stds = ddim_step_std(scheduler, scheduler.timesteps, eta=1.0)
    for t, std in zip(scheduler.timesteps, stds):
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        torch.testing.assert_close(std, scheduler._get_variance(t, prev_t).sqrt().float())
    assert stds[-1] < stds[-2] < 0.2 * stds[-3]  # the final two steps are nearly deterministic (0.02, 0.04 vs 0.26)
    torch.testing.assert_close(ddim_step_std(scheduler, scheduler.timesteps, eta=0.5), 0.5 * stds)


# Scheduler configs a diffusers checkpoint can carry, and the steps of a 4-step schedule left without noise
# (a step to the timestep it starts from: the last one, where the schedule reaches timestep 0)
SCHEDULER_CONFIGS = [
    ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=1), []),  # SD 1.5's released settings
    ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=0), [3]),  # timesteps 750 .. 0
    ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True), [3]),
    ("DDIMScheduler", dict(timestep_spacing="trailing", steps_offset=0), []),  # 999 .. 249
    ("DDIMScheduler", dict(timestep_spacing="linspace", steps_offset=0), [3]),  # 999 .. 0
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=0), [3]),  # an SDXL-style config
]


@pytest.mark.parametrize("name, settings, zero", SCHEDULER_CONFIGS)
def test_zero_variance_steps_are_deterministic_and_refused_for_training(name, settings, zero, tiny_sd_path, tmp_path):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from loop_trl import LOOPConfig, LOOPTrainer
    from loop_trl.rewards import JpegCompressibility

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **settings)
    policy = LOOPStableDiffusionPipeline(pipe)
    assert policy.zero_variance_steps(4) == zero
    traj = policy.sample(["a cat", "a dog"], num_steps=4, guidance_scale=1.0, eta=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.latents).all()
    assert (traj.log_probs[:, zero] == 0).all()
    assert (traj.log_probs[:, [i for i in range(4) if i not in zero]] != 0).all()
    if zero:  # called directly there, the step says why instead of returning NaN
        with pytest.raises(ValueError, match="zero variance"):
            ddim_step_with_logprob(policy.pipeline.scheduler, traj.latents[:, 3], traj.timesteps[:, 3], traj.latents[:, 3])

    def trainer(**fields):
        config = LOOPConfig(num_epochs=1, sample_num_steps=4, sample_batch_size=4, train_batch_size=4, mixed_precision="no",
                            sample_guidance_scale=1.0, output_dir=str(tmp_path), **fields)
        return LOOPTrainer(config, JpegCompressibility(), ["a cat"], policy)

    if zero:
        with pytest.raises(ValueError, match=r"step\(s\) \[3\] .* carry no noise.*train_timestep_stop=-1"):
            trainer()
    run = trainer(train_timestep_stop=-1) if zero else trainer()
    run.step(0, 0)
    assert run.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5


def test_a_non_finite_sampled_log_prob_stops_the_run(tiny_sd_path, tmp_path, monkeypatch):
    from loop_trl import LOOPConfig, LOOPTrainer
    from loop_trl.rewards import JpegCompressibility

    policy = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path)
    config = LOOPConfig(num_epochs=1, sample_num_steps=3, sample_batch_size=4, train_batch_size=4, mixed_precision="no",
                        sample_guidance_scale=1.0, output_dir=str(tmp_path))
    trainer = LOOPTrainer(config, JpegCompressibility(), ["a cat"], policy)
    sample = policy.sample

    def broken(*args, **kwargs):  # what a zero-variance step used to record
        traj = sample(*args, **kwargs)
        traj.log_probs[1, 2] = float("nan")
        return traj

    monkeypatch.setattr(policy, "sample", broken)
    with pytest.raises(RuntimeError, match=r"non-finite log-probability \(sample 1, step 2 of epoch 0\)"):
        trainer.step(0, 0)
