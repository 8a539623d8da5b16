"""Shared fixtures. Every test builds its parts on a temp data directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir: Path):
    from a4ps.config import load_settings
    return load_settings(data_dir=data_dir)


@pytest.fixture
def bus():
    from a4ps.events import EventBus
    return EventBus()
