"""Fixtures of the end-to-end campaign tests: the tiny model and corpora, placed at the
session's facilities (the Italian corpus at site1, the Czech one at site2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xffl_testbed.campaign import make_tiny, place_private_data


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def corpora(testbed, tiny) -> dict[str, str]:
    site1, site2 = testbed.facilities
    return {
        site1.name: place_private_data(site1, tiny / "data" / "italian", "italian"),
        site2.name: place_private_data(site2, tiny / "data" / "czech", "czech"),
    }


@pytest.fixture
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("campaigns")
