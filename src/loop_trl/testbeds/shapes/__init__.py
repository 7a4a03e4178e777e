"""The shapes testbed: synthetic scenes, their prompts, and a verifier reward."""

from .scenes import COLORS, FAMILIES, SHAPES, Scene, Thing, describe, random_scene, render
from .splits import HELD_OUT_PAIRS, all_prompts, evaluate, heldout_prompts, train_prompts
from .verifier import Detection, ShapesReward, detect, parse_prompt, score

__all__ = ["COLORS", "FAMILIES", "HELD_OUT_PAIRS", "SHAPES", "Detection", "all_prompts", "evaluate", "heldout_prompts", "train_prompts", "Scene", "ShapesReward", "Thing", "describe", "detect",
           "parse_prompt", "random_scene", "render", "score"]
