"""Tandem's execution plane on real hardware: models, kernels, the model runner and the engine core.

    from engine import LLM, SamplingParams
"""

from engine.config import EngineConfig, ModelConfig
from engine.sampling import SamplingParams

__all__ = ["EngineConfig", "LLM", "ModelConfig", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":  # imports torch and transformers: only when asked for
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
