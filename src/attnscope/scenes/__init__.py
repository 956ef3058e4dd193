"""The scene world: procedural scenes of coloured Fashion-MNIST items with exact ground truth (class, colour,
cell, box, mask), a co-occurrence knob that builds a language prior into training data, and the language
(captions, POPE questions) that `scene-vlm` is trained on and evaluated with."""
from .language import CAPTION_PROMPT, SYNONYMS, caption_scores, parse_caption, probe_questions, question
from .world import CELL_NAMES, CLASSES, COLOURS, DEFAULT_PAIRS, SPLITS, Scene, SceneObject, SceneWorld

__all__ = ["SceneWorld", "Scene", "SceneObject", "CLASSES", "COLOURS", "CELL_NAMES", "DEFAULT_PAIRS", "SPLITS",
           "CAPTION_PROMPT", "SYNONYMS", "question", "parse_caption", "caption_scores", "probe_questions"]
