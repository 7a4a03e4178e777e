"""Multi-GPU engines: the accelerate configs shipped in examples/accelerate_configs, and FSDP2 sharding
of a policy on CPU (accelerate turns FSDP and DeepSpeed on only with GPU backends; what of them was
checked where is in docs/benchmarks.md)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loop_trl.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "accelerate_configs")


@pytest.mark.parametrize("name, distributed_type, extra", [
    ("ddp.yaml", "MULTI_GPU", {}),
    ("fsdp2.yaml", "FSDP", {"fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}),
    ("deepspeed_zero2.yaml", "DEEPSPEED", {"zero_stage": 2}),
    ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
])
def test_accelerate_configs_load_as_accelerate_reads_them(name, distributed_type, extra):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(CONFIGS, name))
    assert config.distributed_type.value == distributed_type
    assert str(config.mixed_precision) == "bf16"
    engine = config.fsdp_config if distributed_type == "FSDP" else config.deepspeed_config
    for key, value in extra.items():
        assert engine[key] == value, (name, key)


def test_fsdp1_is_refused_with_the_fix(monkeypatch, tiny_sd_path, tmp_path):
    """FSDP version 1 wraps the module, which sampling calls directly: refused at construction."""
    from accelerate.utils import DistributedType

    from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer

    monkeypatch.setattr("accelerate.Accelerator.distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr("accelerate.Accelerator.is_fsdp2", property(lambda self: False))
    config = LOOPConfig(output_dir=str(tmp_path), mixed_precision="no", sample_batch_size=4, train_batch_size=2)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        LOOPTrainer(config, lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}), ["a cat"],
                    LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))


@pytest.mark.slow
def test_fsdp2_sharded_policy_samples_trains_and_saves_like_one_process(tmp_path, tiny_sd_path):
    """Two gloo processes shard the LoRA UNet with fully_shard; sampling calls the sharded module,
    one step updates it, and the adapter written from the gathered state equals a single process's."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    from fsdp2_policy import one_step

    from loop_trl import LOOPStableDiffusionPipeline

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), os.path.join(ROOT, "tests", "scripts", "fsdp2_policy.py"),
               tiny_sd_path, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]

    alone = LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path, lora_rank=4)
    latents = one_step(alone, shard=False)
    torch.testing.assert_close(torch.load(tmp_path / "latents.pt"), latents, rtol=1e-5, atol=1e-5)
    alone.save_weights(str(tmp_path / "alone"))
    sharded = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    reference = load_file(tmp_path / "alone" / "pytorch_lora_weights.safetensors")
    assert sharded.keys() == reference.keys() and len(reference) > 0
    moved = 0
    for key, value in reference.items():
        # float summation order differs between sharded and whole gradients: compare against the tensor's scale
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-4 * value.abs().max().item())
        moved += int(key.endswith("lora.up.weight") and value.abs().max() > 0)
    assert moved > 0  # the step changed the adapter (lora_B starts at zero), so equality is not trivial


LAUNCHED_SCRIPT = """
from loop_trl import LOOPConfig
config = LOOPConfig(output_dir={out!r}, sample_batch_size=4, train_batch_size=2)
print("mixed_precision", config.mixed_precision)
"""


def test_the_launch_configs_mixed_precision_is_the_default(tmp_path):
    """`accelerate launch --config_file ddp.yaml` (bf16) sets the precision unless the config names one."""
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED_SCRIPT.format(out=str(tmp_path / "run")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             os.path.join(CONFIGS, "ddp.yaml"), "--num_processes", "1", str(script)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed_precision bf16" in result.stdout


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state that a second precision cannot change: start and leave clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_launch_settings_reach_the_accelerator_and_an_explicit_value_wins(monkeypatch, tiny_sd_path, tmp_path,
                                                                          fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    from loop_trl import LOOPConfig, LOOPStableDiffusionPipeline, LOOPTrainer

    def trainer(**fields):
        AcceleratorState._reset_state(reset_partial_state=True)
        config = LOOPConfig(output_dir=str(tmp_path), sample_num_steps=3, sample_batch_size=4, train_batch_size=2,
                            **fields)
        return LOOPTrainer(config, lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}), ["a cat"],
                           LOOPStableDiffusionPipeline.from_pretrained(tiny_sd_path))

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    launched = trainer()
    assert launched.config.mixed_precision == "bf16" and launched.accelerator.mixed_precision == "bf16"
    assert launched.accelerator.scaler is None  # no fp16 gradient scaler under bf16
    assert launched.policy.pipeline.vae.dtype == torch.bfloat16
    assert launched.config.train_gradient_accumulation_steps == 2
    # accelerate counts backward calls: 2 minibatches x 3 trained steps each, not the launcher's raw 2
    assert launched.accelerator.gradient_accumulation_steps == 6

    with pytest.warns(UserWarning, match=r"mixed_precision='no' is set in the config and wins over accelerate's launch "
                                         r"setting 'bf16'"):
        explicit = trainer(mixed_precision="no", train_gradient_accumulation_steps=1)
    assert explicit.accelerator.mixed_precision == "no" and explicit.policy.pipeline.vae.dtype == torch.float32
    assert explicit.accelerator.gradient_accumulation_steps == 3

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    assert LOOPConfig().mixed_precision == "no" and LOOPConfig().train_gradient_accumulation_steps == 1
