"""What each denoising step contributes: gradient-norm share against effect on the reward.

    python benchmarks/timestep_diagnostics.py                          # the shapes testbed, 10 steps
    python benchmarks/timestep_diagnostics.py --guidance 4 --num_steps 20

Samples --prompts training prompts x K images with the stochastic DDIM sampler, scores them with
the shapes verifier and computes leave-one-out advantages. Then, for every step index j:

* ``std``: the step's noise standard deviation;
* ``grad_share``: the share of the squared norm of the policy gradient (the LOOP loss at ratio 1,
  over all samples at step j, with respect to the LoRA weights) that step j carries. A step with a
  large share dominates every minibatch it appears in;
* ``resample_changed``: the fraction of images whose reward changes when the trajectory is
  re-sampled with fresh noise from step j on, and ``resample_abs_change`` the mean absolute
  change of the reward: how much the step's randomness can still move the reward, i.e. how much
  signal training the step can carry.

A step with a large gradient share and no effect on the reward adds noise and no signal: leave it
out with ``train_timestep_stop``. Prints a table and writes timestep_diagnostics.json.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from loop_trl.advantages import leave_one_out_advantages
from loop_trl.sampling import ddim_step_std, ddim_step_with_logprob
from loop_trl.testbeds.shapes import ShapesReward, load_policy, train_prompts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/timesteps", help="where timestep_diagnostics.json goes")
    parser.add_argument("--prompts", type=int, default=8, help="training prompts sampled (K images each)")
    parser.add_argument("--k", type=int, default=4, help="images per prompt (K)")
    parser.add_argument("--num_steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta")
    parser.add_argument("--lora_rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise")
    return parser.parse_args(argv)


@torch.no_grad()
def finish_from(policy, traj, step: int, generator: torch.Generator) -> torch.Tensor:
    """Images from re-sampling ``traj`` with fresh noise from step index ``step`` to the end."""
    scheduler, latents = policy.pipeline.scheduler, traj.latents[:, step]
    for t in traj.timesteps[0, step:]:
        timesteps = t.expand(len(traj))
        noise_pred = policy._predict_noise(policy.unet, latents, timesteps, traj.conditioning,
                                           traj.negative_conditioning, traj.guidance_scale)
        latents, _ = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, traj.eta, generator=generator)
    return policy.decode(latents)


def main(argv=None) -> None:
    args = parse_args(argv)
    policy = load_policy(lora_rank=args.lora_rank)
    rng = np.random.default_rng(args.seed)
    prompts = [p for p in rng.choice(train_prompts(), size=args.prompts, replace=False).tolist() for _ in range(args.k)]
    generator = torch.Generator().manual_seed(args.seed)
    traj = policy.sample(prompts, num_steps=args.num_steps, guidance_scale=args.guidance, eta=args.eta, generator=generator)
    reward = ShapesReward()
    rewards = reward(traj.images, prompts, [{}] * len(prompts))[0].float()
    advantages = leave_one_out_advantages(rewards, torch.arange(len(prompts)) // args.k)
    parameters = policy.trainable_parameters()
    stds = ddim_step_std(policy.pipeline.scheduler, traj.timesteps[0], args.eta)

    rows = []
    policy.unet.train()
    for step in range(traj.num_steps):
        policy.unet.zero_grad()
        loss = -(advantages * policy.log_prob(traj, step)).mean()  # the LOOP loss at ratio 1
        loss.backward()
        grad_sq = sum(float(p.grad.pow(2).sum()) for p in parameters)
        changed = reward(finish_from(policy, traj, step, torch.Generator().manual_seed(args.seed + 1 + step)),
                         prompts, [{}] * len(prompts))[0].float()
        rows.append({"step": step, "timestep": int(traj.timesteps[0, step]), "std": float(stds[step]), "grad_sq": grad_sq,
                     "resample_changed": float((changed != rewards).float().mean()),
                     "resample_abs_change": float((changed - rewards).abs().mean())})
    policy.unet.zero_grad()
    total = sum(r["grad_sq"] for r in rows)
    print(f"{len(prompts)} images ({args.prompts} prompts x K={args.k}), {args.num_steps} steps, guidance {args.guidance}, "
          f"eta {args.eta}; mean reward {rewards.mean():.3f}")
    print(f"{'step':>4} {'t':>4} {'std':>7} {'grad_share':>10} {'resample_changed':>16} {'resample_abs_change':>19}")
    for r in rows:
        r["grad_share"] = r["grad_sq"] / total
        print(f"{r['step']:>4} {r['timestep']:>4} {r['std']:>7.4f} {r['grad_share']:>10.3f} {r['resample_changed']:>16.3f} "
              f"{r['resample_abs_change']:>19.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "timestep_diagnostics.json"), "w") as f:
        json.dump({"settings": vars(args), "mean_reward": float(rewards.mean()), "steps": rows}, f, indent=2)


if __name__ == "__main__":
    main()
