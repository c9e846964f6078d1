"""Tandem's execution plane on real hardware: models, kernels, the model runner and the engine core.

    from engine import LLM, SamplingParams

The names below are imported when first asked for, so that importing one submodule (a kernel, say)
does not load the control plane's native module or transformers.
"""

__all__ = ["EngineConfig", "LLM", "ModelConfig", "SamplingParams"]


def __getattr__(name: str):
    if name in ("EngineConfig", "ModelConfig"):
        import engine.config

        return getattr(engine.config, name)
    if name == "SamplingParams":
        from engine.sampling import SamplingParams

        return SamplingParams
    if name == "LLM":  # imports torch and transformers
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
