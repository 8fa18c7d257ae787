"""llmlab: the whole large-language-model lifecycle in one small, tested codebase."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "embed", "load", "save"]
_HOMES = {"embed": "api", "load": "api", "save": "api", "LLM": "infer", "SamplingParams": "infer"}


def __getattr__(name: str):
    # These pull in torch and most of the package; importing them lazily keeps `import llmlab.tokenizer`
    # (and tokenizer worker processes) free of that start-up cost.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'llmlab' has no attribute {name!r}")
