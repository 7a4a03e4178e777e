"""GPU benchmark: speed and memory of LoRA training at real model sizes, in one command.

    python benchmarks/gpu/run.py --output_dir benchmarks/results/gpu                  # on a GPU
    python benchmarks/gpu/run.py --dry_run --output_dir /tmp/gpu-dry                   # CPU, tiny models, one epoch

For each model (SD 1.5 and SD 3.5 Medium by default; FLUX.1-dev, Z-Image, Qwen-Image, FLUX.2 [klein] 4B and Wan 2.1 1.3B with
``--models ... flux_dev z_image qwen_image flux2_klein_4b wan21_1_3b``),
built at full size from its published config with random weights (see models.py; timings and
memory need no trained weights, and the device machine cannot reach the Hub), it trains a LoRA
in bf16 with TF32 matmuls and measures, for each variant:

- ``loop``: LOOP, K=4 images per prompt;
- ``loop_memory``: the same with gradient checkpointing and trajectories kept in CPU memory;
- ``ppo``: PPO as DDPO runs it (K=1, per-prompt reward tracking), the same images per epoch;
- ``ppo_memory``: PPO with the memory options.

Each variant runs one warm-up epoch and ``--epochs`` timed ones and reports the median epoch,
its parts (sampling, reward, training), sampling images/s, training trajectories/s and the peak
GPU memory (``torch.cuda.max_memory_allocated``, reset before each variant). The *floor* replays,
with nothing around them, the exact model calls of one ``loop`` epoch (text encoders, denoiser,
VAE decoder, and the denoiser's training forward and backward passes, captured with forward
hooks): ``epoch_over_floor`` is the trainer's overhead over the model's own work.

``--trl_python`` (and ``--trl_pythonpath``) run TRL 0.23.1's ``DDPOTrainer`` on the SD 1.5 shape
for identical work (benchmarks/trl_anchor/run_ddpo.py, in its own environment: transformers < 5)
against loop-trl's ``ppo`` variant: TRL in fp16 as it is usually run, loop-trl in bf16.

Writes OUT/gpu.json (everything) and OUT/table.md, and prints the table. How to run it on a lent
device machine, wheels included, is in docs/benchmarks.md ("GPU").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import TIMING_PROMPTS, brightness_reward, clock  # noqa: E402
from models import MODELS, POLICY_KWARGS, build_model  # noqa: E402

VARIANTS = {
    "loop": dict(advantage_estimator="loo", num_samples_per_prompt=4),
    "loop_memory": dict(advantage_estimator="loo", num_samples_per_prompt=4, gradient_checkpointing=True,
                        offload_trajectories=True),
    "ppo": dict(advantage_estimator="per_prompt_tracker", num_samples_per_prompt=1),
    "ppo_memory": dict(advantage_estimator="per_prompt_tracker", num_samples_per_prompt=1, gradient_checkpointing=True,
                       offload_trajectories=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="benchmarks/results/gpu", help="where gpu.json and table.md go")
    parser.add_argument("--models", nargs="+", default=["sd15", "sd35_medium"], choices=list(MODELS), help="model shapes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="training variants")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant, after one warm-up epoch")
    parser.add_argument("--images_per_epoch", type=int, default=16, help="sampled images per epoch, the same for every variant")
    parser.add_argument("--sample_batch_size", type=int, default=8, help="images per sampling batch")
    parser.add_argument("--train_batch_size", type=int, default=4, help="trajectories per training minibatch")
    parser.add_argument("--num_steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--timestep_fraction", type=float, default=0.5, help="fraction of the steps trained per trajectory")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (FLUX: its guidance input)")
    parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank (4 is TRL DDPO's fixed rank)")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"], help="loop-trl's mixed precision")
    parser.add_argument("--trl_python", default=None,
                        help="interpreter for TRL 0.23.1's DDPOTrainer on the SD 1.5 shape (skipped when not given)")
    parser.add_argument("--trl_pythonpath", default="",
                        help="PYTHONPATH entries put before src/ for --trl_python (a pip --target folder with TRL's stack)")
    parser.add_argument("--trl_mixed_precision", default="fp16", choices=["no", "fp16", "bf16"], help="TRL's mixed precision")
    parser.add_argument("--dry_run", action="store_true",
                        help="tiny models of each family, one epoch without warm-up, 4 images, 2 steps: checks the script, "
                             "measures nothing (runs on CPU)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.epochs, args.images_per_epoch, args.sample_batch_size, args.train_batch_size, args.num_steps = 1, 4, 4, 2, 2
        args.mixed_precision = "no" if not torch.cuda.is_available() else args.mixed_precision
    if args.images_per_epoch % args.sample_batch_size or args.sample_batch_size % 4:
        parser.error(f"--images_per_epoch ({args.images_per_epoch}) must be a multiple of --sample_batch_size "
                     f"({args.sample_batch_size}), itself a multiple of K=4.")
    return args


class CallRecorder:
    """Records every forward call of some modules (inputs detached) so they can be replayed bare."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules, self.calls, self.handles = modules, [], []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def record(module, args, kwargs):
            def detach(x):  # lists are copied: Qwen-Image's VAE decoder fills its cache lists in place
                if isinstance(x, list):
                    return [detach(v) for v in x]
                return x.detach() if isinstance(x, torch.Tensor) else x

            self.calls.append((name, torch.is_grad_enabled(), [detach(a) for a in args],
                               {k: detach(v) for k, v in kwargs.items()}))
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def replay(self, device: torch.device, autocast) -> dict[str, float]:
        """Seconds of the no-grad calls (sampling) and of the grad calls with their backward passes
        (training), each group timed as one block, in the order recorded, under ``autocast()``."""
        seconds = {}
        for phase, grad in (("sampling", False), ("training", True)):
            calls = [(self.modules[name], args, kwargs) for name, g, args, kwargs in self.calls if g == grad]
            started = clock(device)
            with torch.set_grad_enabled(grad), autocast():
                for module, args, kwargs in calls:
                    out = module(*args, **kwargs)
                    if grad:
                        first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                        if isinstance(first, list):  # Z-Image's transformer returns one tensor per sample
                            first = torch.stack([f.float() for f in first])
                        first.float().square().mean().backward()
            seconds[phase] = clock(device) - started
        for module in self.modules.values():
            module.zero_grad(set_to_none=True)
        return seconds


def summarize_epochs(epochs: list[dict], images_per_epoch: int, epoch_key: str = "time_epoch_s") -> dict:
    """Medians over timed epochs (each a dict of ``time_*_s`` timers): epoch time, its parts, throughputs."""
    median = lambda key: float(np.median([e.get(key, 0.0) for e in epochs]))  # noqa: E731
    return {"median_epoch_s": median(epoch_key),
            "parts_s": {name: median(f"time_{name}_s") for name in ("sampling", "reward", "training")},
            "sampling_images_per_s": images_per_epoch / median("time_sampling_s"),
            "training_trajectories_per_s": images_per_epoch / median("time_training_s")}


def make_config(args: argparse.Namespace, variant: str, output_dir: str, model: str):
    from loop_trl import LOOPConfig

    settings = dict(VARIANTS[variant])
    if model == "flux_dev":  # guidance-distilled: the guidance is an input, not a second pass
        settings["sample_guidance_scale"] = min(args.guidance, 3.5)
    return LOOPConfig(
        num_epochs=args.epochs + 2, seed=0, output_dir=output_dir, mixed_precision=args.mixed_precision,
        sample_num_steps=args.num_steps, sample_guidance_scale=settings.pop("sample_guidance_scale", args.guidance),
        sample_batch_size=args.sample_batch_size, sample_num_batches_per_epoch=args.images_per_epoch // args.sample_batch_size,
        train_batch_size=args.train_batch_size, train_timestep_fraction=args.timestep_fraction, train_learning_rate=1e-4,
        allow_tf32=True, save_freq=10**9, max_consecutive_nonfinite_steps=10**9, **settings)


def run_variant(args: argparse.Namespace, model: str, variant: str, device: torch.device, record: bool) -> dict:
    """Train ``variant`` on a fresh full-size ``model``; return its medians (and the floor if ``record``)."""
    from loop_trl import LOOPTrainer
    from loop_trl.pipelines import POLICY_CLASSES
    from loop_trl.rewards import PerFrameReward

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    built = time.perf_counter()
    pipeline = build_model(model, device, dtype, tiny=args.dry_run)
    pixels = 32 if args.dry_run else MODELS[model][2]  # the tiny models are 32 px; the full-size ones MODELS' size
    policy = POLICY_CLASSES[type(pipeline).__name__](pipeline, lora_rank=args.lora_rank, resolution=pixels,
                                                     **POLICY_KWARGS.get(model, {}))
    build_s = time.perf_counter() - built
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as work:
        reward = PerFrameReward(brightness_reward) if policy.produces_video else brightness_reward  # videos: per frame
        trainer = LOOPTrainer(make_config(args, variant, work, model), reward, TIMING_PROMPTS, policy)
        epochs = []
        warmup = 0 if args.dry_run else 1
        for epoch in range(warmup + args.epochs):
            trainer.global_step = trainer.step(epoch, trainer.global_step)
            if epoch >= warmup:
                epochs.append({f"time_{k[len('time/'):]}": v for k, v in trainer.last_metrics.items() if k.startswith("time/")})
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        recorder = None
        if record:  # one more, untimed epoch whose model calls are recorded, then replayed bare
            modules = {"denoiser": policy.trainable_module, "vae_decoder": pipeline.vae.decoder}
            modules.update({name: m for name, m in pipeline.components.items()
                            if name.startswith("text_encoder") and m is not None})
            recorder = CallRecorder(modules)
            trainer.step(warmup + args.epochs, trainer.global_step)
            recorder.remove()
        result = {"model": model, "variant": variant, "build_s": build_s, **summarize_epochs(epochs, args.images_per_epoch),
                  "peak_memory_mb": peak, "nonfinite_steps": trainer.nonfinite_steps}
        if recorder is not None:
            floor = recorder.replay(device, policy._autocast)
            result["floor_s"] = floor
            result["epoch_over_floor"] = result["median_epoch_s"] / sum(floor.values())
        del trainer, policy, pipeline, recorder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_trl(args: argparse.Namespace, work: str) -> dict:
    """TRL 0.23.1's DDPOTrainer on the SD 1.5 shape, same work as loop-trl's ``ppo`` variant, its own process."""
    folder = os.path.join(work, "sd15")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        from loop_trl.testbeds.shapes.train_base import prefix_text_encoder_keys, write_slow_tokenizer_files

        pipeline = build_model("sd15", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float16,
                               tiny=args.dry_run)
        pipeline.save_pretrained(folder, safe_serialization=True)
        # what transformers 4 (TRL's stack) needs to read a folder transformers 5 wrote
        write_slow_tokenizer_files(pipeline.tokenizer, os.path.join(folder, "tokenizer"))
        prefix_text_encoder_keys(os.path.join(folder, "text_encoder", "model.safetensors"))
        del pipeline
    out = os.path.join(work, "trl")
    command = [args.trl_python, os.path.join(ROOT, "benchmarks", "trl_anchor", "run_ddpo.py"), "--output_dir", out,
               "--pretrained_model", folder, "--reward", "brightness", "--epochs", str(args.epochs + (0 if args.dry_run else 1)),
               "--images_per_epoch", str(args.images_per_epoch), "--sample_batch_size", str(args.sample_batch_size),
               "--train_batch_size", str(args.train_batch_size), "--num_steps", str(args.num_steps),
               "--guidance", str(args.guidance), "--timestep_fraction", str(args.timestep_fraction),
               "--lr", "1e-4", "--mixed_precision", args.trl_mixed_precision]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.trl_pythonpath, os.path.join(ROOT, "src")) if p))
    subprocess.run(command, check=True, env=env)
    with open(os.path.join(out, "result.json")) as f:
        trl = json.load(f)
    timed = trl["epochs"][0 if args.dry_run else 1:]
    return {"model": "sd15", "variant": "trl_ddpo", **summarize_epochs(timed, args.images_per_epoch, "wall_epoch_s"),
            "peak_memory_mb": trl["peak_memory_mb"] if trl.get("device") == "cuda" else None, "versions": trl["versions"]}


def table(results: list[dict]) -> str:
    """Markdown table of every variant, with ratios to the model's ``loop`` (floor) and to TRL."""
    lines = ["| model | variant | epoch s | sampling img/s | training traj/s | epoch / floor | peak GPU MB | vs TRL (throughput, memory) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    trl = next((r for r in results if r["variant"] == "trl_ddpo"), None)
    for r in results:
        versus = "-"
        if trl is not None and r["model"] == "sd15" and r["variant"] != "trl_ddpo":
            memory = f"{r['peak_memory_mb'] / trl['peak_memory_mb']:.2f}x" if r["peak_memory_mb"] and trl["peak_memory_mb"] else "-"
            versus = f"{trl['median_epoch_s'] / r['median_epoch_s']:.2f}x, {memory}"
        over = f"{r['epoch_over_floor']:.2f}" if "epoch_over_floor" in r else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['median_epoch_s']:.2f} | {r['sampling_images_per_s']:.2f} | "
                     f"{r['training_trajectories_per_s']:.2f} | {over} | {peak} | {versus} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("No GPU: this benchmark measures GPU speed and memory. --dry_run checks it on CPU with tiny models.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    started = time.perf_counter()
    results = []
    for model in args.models:
        for variant in args.variants:
            print(f"[{model}] {variant}", flush=True)
            results.append(run_variant(args, model, variant, device, record=variant == "loop"))
            print(f"    epoch {results[-1]['median_epoch_s']:.2f} s, peak {results[-1]['peak_memory_mb']} MB", flush=True)
    if args.trl_python and "sd15" in args.models:
        with tempfile.TemporaryDirectory() as work:
            print("[sd15] trl_ddpo", flush=True)
            results.append(run_trl(args, work))
    import diffusers
    import transformers

    report = {"device": name, "date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run, "args": vars(args),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__},
              "total_s": time.perf_counter() - started, "results": results}
    with open(os.path.join(args.output_dir, "gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = f"{name}, {report['date']}, {args.num_steps} steps, {args.images_per_epoch} images per epoch\n\n{table(results)}\n"
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
