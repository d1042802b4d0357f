"""Shared fixtures: a tiny Qwen3 model with a character tokenizer, built offline once per session, and
the operator's (`cluster`: a KMock API server; `start_operator`: the real operator against it)."""

from __future__ import annotations

import os

import pytest

from operator_fixtures import cluster, start_operator  # noqa: F401 (fixtures for every module)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from g2rpo.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))
