"""The tiny model and corpora, made once for the training tests (``python -m xffl_tasks.tiny``'s
own function, in this process)."""

from __future__ import annotations

import pytest

from xffl_tasks.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-train") / "tiny", seed=0)
