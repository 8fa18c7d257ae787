"""llmlab: the whole large-language-model lifecycle in one small, tested codebase."""

__version__ = "0.1.0"

from .api import embed, load, save  # noqa: E402

__all__ = ["embed", "load", "save"]
