"""Model definitions (decoder.py) and built-in shapes for random-weight runs (shapes.py)."""

from engine.models.decoder import CausalLM
from engine.models.shapes import SHAPES, shape_config

__all__ = ["CausalLM", "SHAPES", "shape_config"]
