"""The shapes testbed: synthetic scenes, their prompts, a verifier reward, and a small base model."""

from .model import MODEL_DIR, load_pipeline, load_policy
from .scenes import COLORS, FAMILIES, SHAPES, Scene, Thing, describe, random_scene, render
from .splits import (HELD_OUT_PAIRS, all_prompts, evaluate, evaluate_plain_pipeline, heldout_prompts, train_eval_prompts,
                     train_prompts)
from .verifier import Detection, ShapesReward, detect, parse_prompt, score

__all__ = [
    "COLORS", "FAMILIES", "HELD_OUT_PAIRS", "MODEL_DIR", "SHAPES", "Detection", "Scene", "ShapesReward", "Thing",
    "all_prompts", "describe", "detect", "evaluate", "evaluate_plain_pipeline", "heldout_prompts", "load_pipeline", "load_policy",
    "parse_prompt", "random_scene", "render", "score", "train_eval_prompts", "train_prompts",
]
