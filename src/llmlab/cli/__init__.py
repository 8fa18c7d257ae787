"""The `llmlab` command: one module per command group."""
