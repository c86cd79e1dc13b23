"""Fixtures shared by the diffusion tests."""

import pytest

from tests.diffusion.unclip_helpers import train_unclip_runs


@pytest.fixture(scope="session")
def unclip_runs(tmp_path_factory):
    """A tiny CLIP folder with a prior and a decoder trained on it through the CLI (clip/, prior/, decoder/)."""
    return train_unclip_runs(tmp_path_factory.mktemp("unclip"))
