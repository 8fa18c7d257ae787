"""llmlab: the whole large-language-model lifecycle in one small, tested codebase."""

__version__ = "0.1.0"
__all__ = ["embed", "load", "save"]


def __getattr__(name: str):
    # load/save/embed pull in torch and the io package; importing them lazily keeps `import llmlab.tokenizer`
    # (and tokenizer worker processes) free of that start-up cost.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmlab' has no attribute {name!r}")
