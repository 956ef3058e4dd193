"""`attnscope.evaluate`: faithfulness (deletion / insertion / positive-negative perturbation, with the random map
beside), localisation (pointing game, energy-based pointing), agreement with the saliency head, and the
Fashion-MNIST canvas classifier these are measured on. Every metric works on one `Explanation`; `grounding` scores an
`attnscope.ground` result (pointing, box IoU, energy in an exact mask)."""
from . import grounding
from .agreement import saliency_agreement, saliency_map
from .faithfulness import Curve, FaithfulnessResult, faithfulness
from .pointing import energy_pointing, pointing_game

__all__ = ["faithfulness", "FaithfulnessResult", "Curve", "pointing_game", "energy_pointing", "saliency_agreement",
           "saliency_map", "grounding"]
