import pytest
from transformers import HfArgumentParser

from loop_trl import LOOPConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_samples_per_prompt": 1}, "num_samples_per_prompt"),
        ({"num_samples_per_prompt": 1, "advantage_estimator": "group_norm"}, "num_samples_per_prompt"),
        ({"sample_batch_size": 6, "num_samples_per_prompt": 4}, "sample_batch_size"),
        ({"sample_batch_size": 8, "sample_num_batches_per_epoch": 1, "train_batch_size": 3}, "train_batch_size"),
        ({"train_clip_range": 0.0}, "train_clip_range"),
        ({"train_clip_range": -0.1}, "train_clip_range"),
        ({"advantage_estimator": "mean"}, "advantage_estimator"),
        ({"sample_eta": 0.0}, "sample_eta"),
        ({"train_timestep_fraction": 0.0}, "train_timestep_fraction"),
        ({"train_timestep_fraction": 1.5}, "train_timestep_fraction"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"sample_guidance_scale": 0.5}, "sample_guidance_scale"),
        ({"train_learning_rate": 0.0}, "train_learning_rate"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"train_gradient_accumulation_steps": 3, "sample_batch_size": 8, "train_batch_size": 4}, "train_gradient_accumulation_steps"),
        ({"resume_from": "/no/such/checkpoint"}, "resume_from"),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"log_with": "tensorbored"}, "log_with"),
        ({"tracker_kwargs": "{not json"}, "tracker_kwargs"),
        ({"accelerator_kwargs": "[1, 2]"}, "accelerator_kwargs"),
        ({"per_prompt_stat_tracking": True, "advantage_estimator": "group_norm"}, "per_prompt_stat_tracking"),
        ({"train_lr_scheduler": "cosine", "train_lr_min_ratio": 1.0}, "train_lr_min_ratio"),
        ({"train_lr_scheduler": "linear", "train_lr_min_ratio": 0.5}, "train_lr_min_ratio"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LOOPConfig(**kwargs)


def test_valid_configs_construct():
    LOOPConfig()
    LOOPConfig(num_samples_per_prompt=1, advantage_estimator="per_prompt_tracker", sample_batch_size=3)
    LOOPConfig(num_samples_per_prompt=1, advantage_estimator="batch_norm", train_clip_range=float("inf"))
    config = LOOPConfig(per_prompt_stat_tracking=True)  # DDPO's flag maps onto the estimator
    assert config.advantage_estimator == "per_prompt_tracker"
    assert LOOPConfig(sample_num_steps=50, train_timestep_fraction=0.5).num_train_timesteps == 25


def test_every_field_has_help_and_parses_from_cli_and_yaml(tmp_path):
    for name, f in LOOPConfig.__dataclass_fields__.items():
        assert f.metadata.get("help"), f"{name} has no help text"
    parser = HfArgumentParser(LOOPConfig)
    (config,) = parser.parse_args_into_dataclasses(["--num_samples_per_prompt", "8", "--sample_batch_size", "16",
                                                     "--train_clip_range", "inf", "--mixed_precision", "no",
                                                     "--tracker_kwargs", '{"wandb": {"entity": "me"}}'])
    assert config.num_samples_per_prompt == 8 and config.train_clip_range == float("inf")
    assert config.tracker_kwargs == {"wandb": {"entity": "me"}}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("num_epochs: 3\nadvantage_estimator: group_norm\n")
    (config,) = parser.parse_yaml_file(str(yaml_file))
    assert config.num_epochs == 3 and config.advantage_estimator == "group_norm"
