"""Fixtures of the trainer tests (the helpers themselves are in train_helpers.py)."""

import pytest
from train_helpers import write_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
