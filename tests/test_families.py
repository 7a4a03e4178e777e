"""Conformance of every model family behind the policy interface (tiny pipelines, CPU, no network).

Each family passes the same checks: it loads through ``load_policy`` from a saved folder,
re-scoring its stored transitions reproduces the sampling log-probs, trajectories slice and
reorder without changing a score, gradients reach every LoRA matrix, the trainer runs an epoch
on it unchanged, and the adapter it saves reproduces its images in the plain diffusers pipeline.
"""

import os

import pytest
import torch

from loop_trl import LOOPConfig, LOOPTrainer, load_policy
from loop_trl.pipelines import (LOOPFlux2KleinPipeline, LOOPFlux2Pipeline, LOOPFluxPipeline, LOOPQwenImagePipeline, LOOPStableDiffusion3Pipeline, LOOPStableDiffusionPipeline,
                                LOOPStableDiffusionXLPipeline, LOOPWanPipeline, LOOPZImagePipeline, Trajectories)
from loop_trl.rewards import JpegCompressibility, PerFrameReward
from loop_trl.testing import save_tiny_pipeline

FAMILIES = {
    "stable-diffusion": LOOPStableDiffusionPipeline,
    "stable-diffusion-xl": LOOPStableDiffusionXLPipeline,
    "stable-diffusion-3": LOOPStableDiffusion3Pipeline,
    "flux": LOOPFluxPipeline,
    "flux2-klein": LOOPFlux2KleinPipeline,
    "flux2-dev": LOOPFlux2Pipeline,
    "qwen-image": LOOPQwenImagePipeline,
    "z-image": LOOPZImagePipeline,
    "wan": LOOPWanPipeline,
}
FLOW_FAMILIES = ("stable-diffusion-3", "flux", "flux2-klein", "flux2-dev", "qwen-image", "z-image", "wan")
VIDEO_FRAMES = {"wan": 5}  # the video families: frames per sample
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_pipeline(root / family, family) for family in FAMILIES}


def policy_kwargs(family: str) -> dict:
    kwargs = dict(resolution=32, lora_rank=4)
    if family in FLOW_FAMILIES:
        kwargs["max_sequence_length"] = 16
    if family in VIDEO_FRAMES:
        kwargs["num_frames"] = VIDEO_FRAMES[family]
    return kwargs


def sample_shape(family: str, batch: int = 2) -> tuple[int, ...]:
    """What the policy's ``images`` (and the plain pipeline's output) hold: images, or videos' frames."""
    return (batch, VIDEO_FRAMES[family], 3, 32, 32) if family in VIDEO_FRAMES else (batch, 3, 32, 32)


def reward_for(family: str):
    return PerFrameReward(JpegCompressibility()) if family in VIDEO_FRAMES else JpegCompressibility()


def eta_for(family: str) -> float:
    return 0.7 if family in FLOW_FAMILIES else 1.0


def sample(policy, family, prompts=PROMPTS, seed=0, guidance=3.0) -> Trajectories:
    return policy.sample(prompts, num_steps=3, guidance_scale=guidance, eta=eta_for(family),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_samples_and_rescoring_is_on_policy(family, tiny_paths):
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))
    assert type(policy) is FAMILIES[family]
    traj = sample(policy, family)
    assert traj.images.shape == sample_shape(family) and traj.log_probs.shape == (2, 3)
    assert traj.latents.shape[:2] == (2, 4) and torch.isfinite(traj.log_probs).all()
    assert all(v.shape[0] == 2 for v in traj.conditioning.values())
    torch.testing.assert_close(sample(policy, family).latents, traj.latents, rtol=0, atol=0)  # a seed fixes it
    assert not torch.equal(sample(policy, family, seed=1).latents, traj.latents)

    rescored = torch.stack([policy.log_prob(traj, j) for j in range(3)], dim=1)
    assert (rescored - traj.log_probs).abs().max() < 1e-5
    # mixed step indices in one call, on a reordered and re-concatenated batch
    shuffled = Trajectories.cat([traj[[1]], traj[[0]]])
    mixed = policy.log_prob(shuffled, torch.tensor([2, 0]))
    torch.testing.assert_close(mixed, torch.stack([traj.log_probs[1, 2], traj.log_probs[0, 0]]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_lora_matrix(family, tiny_paths):
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))
    named = {n: p for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    assert named and all("lora_" in n for n in named) and all(p.dtype == torch.float32 for p in named.values())
    with torch.no_grad():  # B starts at zero (so A gets no gradient): move it off zero first
        for n, p in named.items():
            if "lora_B" in n:
                p.normal_(std=0.02)
    traj = sample(policy, family)
    policy.log_prob(traj, 1).sum().backward()
    missing = [n for n, p in named.items() if p.grad is None or p.grad.abs().max() == 0]
    if family == "stable-diffusion-3":  # SD3's last block drops its text stream: its text queries reach nothing
        last = len(policy.trainable_module.transformer_blocks) - 1
        missing = [n for n in missing if not n.startswith(f"transformer_blocks.{last}.attn.add_q_proj.")]
    assert not missing, missing[:3]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trainer_runs_each_family_unchanged(family, tiny_paths, tmp_path):
    config = LOOPConfig(num_epochs=1, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=1,
                        num_samples_per_prompt=2, train_batch_size=4, mixed_precision="no", sample_guidance_scale=2.0,
                        sample_eta=eta_for(family), train_learning_rate=1e-2, output_dir=str(tmp_path / "run"), seed=0,
                        # the flow families with an SDE window over steps 1-2 (Flow-GRPO-Fast / MixGRPO style)
                        sample_sde_window=family in FLOW_FAMILIES, train_timestep_start=1)
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))
    trainer = LOOPTrainer(config, reward_for(family), PROMPTS, policy)
    before = [p.detach().clone() for p in trainer.trainable_parameters]
    trainer.step(0, 0)
    assert trainer.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.trainable_parameters))
    out = tmp_path / "adapter"
    trainer.save_pretrained(str(out))
    card = (out / "README.md").read_text()
    pipeline_class = FAMILIES[family].pipeline_class.__name__
    assert f"{pipeline_class}.from_pretrained" in card and f"from diffusers import {pipeline_class}" in card
    assert ("eta=" in card) == (family in ("stable-diffusion", "stable-diffusion-xl"))  # the flow pipelines take no eta


def _guidance_kwargs(family, scale=3.0):
    """How each plain pipeline is told loop-trl's guidance ``scale`` (independent of the model cards' own way)."""
    if family == "qwen-image":  # QwenImagePipeline's classifier-free guidance needs a negative prompt
        return {"true_cfg_scale": scale, "negative_prompt": " "}
    return {"guidance_scale": scale - 1.0 if family == "z-image" else scale}  # ZImagePipeline: pos + w (pos - neg)


def _call(pipe, family, **kwargs):
    """The plain pipeline's output as a tensor: images (B, 3, H, W), or a video pipeline's frames (B, F, 3, H, W)."""
    if family in FLOW_FAMILIES:
        kwargs["max_sequence_length"] = 16
    if family in VIDEO_FRAMES:
        return pipe(num_frames=VIDEO_FRAMES[family], **kwargs).frames
    return pipe(**kwargs).images


def _generate(pipe, family):
    return _call(pipe, family, prompt="a red circle", num_inference_steps=3, output_type="pt", height=32, width=32,
                 generator=torch.Generator().manual_seed(0), **_guidance_kwargs(family))


def _scored_by(policy, module, traj) -> torch.Tensor:
    """``module``'s raw output (no guidance) on the stored latents of step 1, through the family's own forward:
    where a LoRA at the wrong strength shows before sampling or the VAE can blur it."""
    _, latents, _ = traj.transition(1)
    with torch.no_grad():
        if hasattr(policy, "_predict_noise"):  # the UNet families: noise prediction at the stored timestep
            return policy._predict_noise(module, latents, traj.timesteps[:, 1], traj.conditioning, None, 1.0)
        return policy._velocity(module, latents, traj.sigmas[:, 1], traj.conditioning, None, 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_distribution_and_the_reference_for_the_kl_penalty(family, tiny_paths):
    """step_distribution's log-probability is log_prob's; its std is the sampler's; the reference is the base
    module loaded afresh by diffusers, and the adapter is back on after the context."""
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))
    with torch.no_grad():  # a LoRA that changes the output, as training would
        for n, p in policy.trainable_module.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    traj = sample(policy, family)
    step = torch.tensor([1, 2])
    with torch.no_grad():
        dist = policy.step_distribution(traj, step)
        torch.testing.assert_close(dist.log_prob, policy.log_prob(traj, step), rtol=0, atol=0)
        assert dist.mean.shape == traj.latents[:, 0].shape and bool((dist.std > 0).all())
        base = getattr(FAMILIES[family].pipeline_class.from_pretrained(tiny_paths[family]), policy.module_name)
        with policy.reference() as reference:
            torch.testing.assert_close(policy.step_distribution(traj, step, denoiser=reference).mean,
                                       policy.step_distribution(traj, step, denoiser=base).mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(policy.step_distribution(traj, step).mean, dist.mean, rtol=0, atol=0)
        assert (dist.mean - policy.step_distribution(traj, step, denoiser=base).mean).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_reproduces_the_policy_in_plain_diffusers(family, tiny_paths, tmp_path):
    # alpha != rank: diffusers assumes alpha = rank unless the LoRA config is saved with the weights
    policy = load_policy(tiny_paths[family], **{**policy_kwargs(family), "lora_alpha": 8})
    with torch.no_grad():  # stands in for training: a LoRA that changes the output
        for n, p in policy.trainable_module.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    policy.save_weights(str(tmp_path / "adapter"))
    assert os.listdir(tmp_path / "adapter") == ["pytorch_lora_weights.safetensors"]

    pipeline_class = FAMILIES[family].pipeline_class
    fresh = pipeline_class.from_pretrained(tiny_paths[family])
    fresh.scheduler = type(policy.pipeline.scheduler).from_config(policy.pipeline.scheduler.config)
    base = _generate(fresh, family)
    fresh.load_lora_weights(str(tmp_path / "adapter"))  # the user's path, not ours
    assert getattr(fresh, policy.module_name).peft_config["default_0"].lora_alpha == 8
    trained = _generate(policy.pipeline, family)
    torch.testing.assert_close(_generate(fresh, family), trained, atol=1e-5, rtol=0)
    assert (base - trained).abs().max() > 1e-3
    # the denoiser itself, where a wrong strength shows before the VAE can blur it
    traj = sample(policy, family)
    mine = _scored_by(policy, policy.trainable_module, traj)
    torch.testing.assert_close(_scored_by(policy, getattr(fresh, policy.module_name), traj), mine, atol=1e-5, rtol=1e-5)

    # loop-trl's own loading, into a new policy and into one made with another rank and alpha
    continued = load_policy(tiny_paths[family], adapter=str(tmp_path / "adapter"), **policy_kwargs(family))
    assert continued.trainable_module.peft_config["default"].lora_alpha == 8
    torch.testing.assert_close(_generate(continued.pipeline, family), trained, atol=1e-5, rtol=0)
    other = load_policy(tiny_paths[family], **{**policy_kwargs(family), "lora_rank": 2})
    other.load_weights(str(tmp_path / "adapter"))
    torch.testing.assert_close(_scored_by(policy, other.trainable_module, traj), mine, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for n, p in other.trainable_module.named_parameters() if "lora_" in n)
    assert {n for n, _ in other.trainable_module.named_parameters() if "lora_" in n} == \
        {n for n, _ in policy.trainable_module.named_parameters() if "lora_" in n}


def test_an_adapter_saved_by_diffusers_without_a_config_loads_as_diffusers_loads_it(tiny_paths, tmp_path):
    """No saved LoRA config (older files, other tools): diffusers takes alpha = rank; so must we."""
    from peft.utils import get_peft_model_state_dict
    family = "stable-diffusion-3"
    policy = load_policy(tiny_paths[family], **{**policy_kwargs(family), "lora_alpha": 8})
    with torch.no_grad():
        for n, p in policy.trainable_module.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    layers = get_peft_model_state_dict(policy.trainable_module)
    FAMILIES[family].pipeline_class.save_lora_weights(str(tmp_path), transformer_lora_layers=layers)
    fresh = FAMILIES[family].pipeline_class.from_pretrained(tiny_paths[family])
    fresh.load_lora_weights(str(tmp_path))
    loaded = load_policy(tiny_paths[family], adapter=str(tmp_path), **policy_kwargs(family))
    traj = sample(policy, family)
    theirs = _scored_by(policy, fresh.transformer, traj)
    torch.testing.assert_close(_scored_by(policy, loaded.trainable_module, traj), theirs, atol=1e-5, rtol=1e-5)
    assert (theirs - _scored_by(policy, policy.trainable_module, traj)).abs().max() > 1e-3  # alpha 4, not 8


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_full_finetuning_of_a_transformer_saves_and_loads(family, tiny_paths, tmp_path):
    policy = load_policy(tiny_paths[family], use_lora=False, **policy_kwargs(family))
    params = policy.trainable_parameters()
    assert len(params) == len(list(policy.trainable_module.parameters()))
    with torch.no_grad():
        params[0].add_(1.0)
    policy.save_weights(str(tmp_path / "full"))
    assert os.path.isfile(tmp_path / "full" / "transformer" / "config.json")
    reloaded = load_policy(tiny_paths[family], use_lora=False, **policy_kwargs(family))
    reloaded.load_weights(str(tmp_path / "full"))
    torch.testing.assert_close(reloaded.trainable_parameters()[0], params[0])


def test_load_policy_names_what_it_supports(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="is a KandinskyPipeline; loop-trl trains StableDiffusionPipeline"):
        load_policy(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_policy(str(tmp_path / "empty"))


@pytest.mark.parametrize("family", ["flux", "flux2-dev"])
def test_guidance_distilled_models_embed_the_guidance_and_refuse_a_negative_prompt(family, tiny_paths):
    """FLUX.1 [dev] and FLUX.2 [dev] take the guidance scale as an input: one pass, no unconditional branch."""
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))
    with pytest.raises(ValueError, match="no negative prompt"):
        policy.sample(PROMPTS, num_steps=2, guidance_scale=3.0, eta=0.7, generator=torch.Generator(),
                      negative_prompt="blurry")
    guided = sample(policy, family, guidance=3.0)
    assert guided.negative_conditioning is None
    assert not torch.allclose(guided.latents[:, 1], sample(policy, family, guidance=1.0).latents[:, 1])
    # scored with the guidance it was sampled with, whatever the trainer passes (train_cfg=False passes 1)
    torch.testing.assert_close(policy.log_prob(guided, 1, guidance_scale=1.0), guided.log_probs[:, 1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 4"):
        load_policy(tiny_paths[family], resolution=30)


@pytest.mark.parametrize("family", FAMILIES)
def test_sde_window_samples_deterministically_outside_it(family, tiny_paths):
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))

    def run(window):
        return policy.sample(PROMPTS, num_steps=3, guidance_scale=3.0, eta=eta_for(family),
                             generator=torch.Generator().manual_seed(0), stochastic_steps=window)

    window, none = run([1]), run([])
    assert (window.log_probs[:, [0, 2]] == 0).all() and (window.log_probs[:, 1] != 0).all()
    assert (none.log_probs == 0).all()
    torch.testing.assert_close(window.latents[:, :2], none.latents[:, :2], rtol=0, atol=0)  # same noise, step 0 deterministic
    assert not torch.allclose(window.latents[:, 2], none.latents[:, 2])  # step 1 adds noise
    assert (policy.log_prob(window, 1) - window.log_probs[:, 1]).abs().max() < 1e-5


@pytest.mark.parametrize("family, sde_type", [("stable-diffusion-3", "dance_grpo"), ("flux", "cps")])
def test_the_other_flow_samplers_sample_rescore_and_train(family, sde_type, tiny_paths, tmp_path):
    policy = load_policy(tiny_paths[family], sde_type=sde_type, **policy_kwargs(family))
    traj = policy.sample(PROMPTS, num_steps=3, guidance_scale=3.0, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert traj.sde_type == sde_type
    stochastic = [0, 1] if sde_type == "cps" else [0, 1, 2]
    assert policy.zero_variance_steps(3) == ([2] if sde_type == "cps" else [])
    assert (traj.log_probs[:, stochastic] != 0).all() and (traj.log_probs[:, 2] == 0).all() == (sde_type == "cps")
    rescored = torch.stack([policy.log_prob(traj, j) for j in stochastic], dim=1)
    assert (rescored - traj.log_probs[:, stochastic]).abs().max() < 1e-5
    default = load_policy(tiny_paths[family], **policy_kwargs(family))
    other = default.sample(PROMPTS, num_steps=3, guidance_scale=3.0, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(other.latents[:, 1], traj.latents[:, 1])  # a different sampler from the same noise

    config = dict(num_epochs=1, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=1,
                  num_samples_per_prompt=2, train_batch_size=4, mixed_precision="no", sample_guidance_scale=2.0,
                  sample_eta=0.5, train_learning_rate=1e-2, output_dir=str(tmp_path / "run"), seed=0)
    if sde_type == "cps":  # its last step lands on the image without noise: training it is refused by name
        with pytest.raises(ValueError, match=r"step\(s\) \[2\] .*'cps'.*train_timestep_stop=-1"):
            LOOPTrainer(LOOPConfig(**config), JpegCompressibility(), PROMPTS, policy)
        with pytest.raises(ValueError, match=r"sample_eta=1.5: .*cps.*must lie in \(0, 1\], got 1.5"):
            LOOPTrainer(LOOPConfig(**{**config, "sample_eta": 1.5, "train_timestep_stop": -1}), JpegCompressibility(),
                        PROMPTS, policy)
        with pytest.raises(ValueError, match=r"eval_eta=1.5: .*cps.*must lie in \(0, 1\], got 1.5"):  # not at the first evaluation
            LOOPTrainer(LOOPConfig(**{**config, "eval_eta": 1.5, "train_timestep_stop": -1}), JpegCompressibility(),
                        PROMPTS, policy)
        config["train_timestep_stop"] = -1
    trainer = LOOPTrainer(LOOPConfig(**config), JpegCompressibility(), PROMPTS, policy)
    before = [p.detach().clone() for p in trainer.trainable_parameters]
    trainer.step(0, 0)
    assert trainer.last_metrics["train/onpolicy_max_abs_logratio"] < 1e-5
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.trainable_parameters))
    with pytest.raises(ValueError, match="sde_type must be one of flow_grpo, dance_grpo, cps, got 'sde'"):
        load_policy(tiny_paths[family], sde_type="sde", **policy_kwargs(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_with_one_generator_per_sample_an_image_does_not_depend_on_its_batch(family, tiny_paths):
    policy = load_policy(tiny_paths[family], **policy_kwargs(family))

    def run(prompts, seeds):
        return policy.sample(prompts, num_steps=3, guidance_scale=3.0, eta=eta_for(family),
                             generator=[torch.Generator().manual_seed(s) for s in seeds])

    pair, alone = run(PROMPTS, [5, 7]), run(PROMPTS[1:], [7])
    # Equal up to float32 rounding: a batch of one and a batch of two take different matmul kernels, whose
    # summation order differs (seen: 1.03e-5 on latents of size ~3.5 with one thread). An image that
    # depended on its batch would differ by O(1).
    torch.testing.assert_close(alone.latents[0], pair.latents[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.log_probs[0], pair.log_probs[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        run(PROMPTS, [1, 2, 3])


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_sampling_is_what_the_model_cards_pipeline_samples(family, tiny_paths, tmp_path):
    """The sampler users deploy: the model card's own snippet (its scheduler line included) run on plain
    diffusers gives, from the same initial noise with eta 0, the policy's deterministic samples."""
    from loop_trl.hub import make_model_card

    policy = load_policy(tiny_paths[family], **{**policy_kwargs(family), "lora_alpha": 8})
    with torch.no_grad():
        for n, p in policy.trainable_module.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    policy.save_weights(str(tmp_path))
    info = policy.model_card_info()
    card = make_model_card(base_model=tiny_paths[family], reward_name="r", repo_id=str(tmp_path),
                           config={"sample_num_steps": 3, "sample_guidance_scale": 3.0, "sample_eta": 1.0}, **info)
    code = card.content.split("```python\n")[1].split("```")[0]
    load = code.split("\nvideo = pipe(" if family in VIDEO_FRAMES else "\nimage = pipe(")[0].replace('.to("cuda")', "").replace("torch.bfloat16", "torch.float32")
    namespace = {}
    exec(load, namespace)  # noqa: S102 - the card's own code, on the tiny checkpoint
    pipe = namespace["pipe"]
    assert type(pipe.scheduler) is type(policy.pipeline.scheduler)
    assert dict(pipe.scheduler.config) == dict(policy.pipeline.scheduler.config)
    assert ("eta=1.0" in code) == (family in ("stable-diffusion", "stable-diffusion-xl"))  # DDIM takes eta; the ODE has none
    guidance = _guidance_kwargs(family)
    assert ", ".join(f"{key}={value!r}" for key, value in guidance.items()) in code  # how the card tells the pipeline

    traj = policy.sample(PROMPTS, num_steps=3, guidance_scale=3.0, eta=eta_for(family),
                         generator=torch.Generator().manual_seed(0), stochastic_steps=[])
    kwargs = dict(num_inference_steps=3, **guidance, output_type="pt", height=32, width=32,
                  latents=traj.latents[:, 0] / getattr(policy.pipeline.scheduler, "init_noise_sigma", 1.0))
    if info["takes_eta"]:
        kwargs["eta"] = 0.0
    if family in VIDEO_FRAMES:  # the card passes the trained frame count and size
        assert f"num_frames={VIDEO_FRAMES[family]}, height=32, width=32).frames[0]" in code and "export_to_video" in code
    theirs = _call(pipe, family, prompt=PROMPTS, **kwargs)
    torch.testing.assert_close(theirs, traj.images, atol=1e-4, rtol=0)
