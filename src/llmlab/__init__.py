"""llmlab: the whole large-language-model lifecycle in one small, tested codebase."""

__version__ = "0.1.0"
