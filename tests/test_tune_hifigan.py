"""recipes/hifigan_tune.yaml runs as shipped: the search finds a vocoder that meets its target on the evaluation
sentences' mels it never saw, from a recipe that names no block."""
from __future__ import annotations

import pytest
from conftest import REPO
from tune_recipe import assert_tuned_recipe_runs

# A whole search (about 12 minutes on 2 cores), whose latency bound a test running beside it
# on the other core can miss: it runs alone, after the parallel tests.
pytestmark = [pytest.mark.e2e, pytest.mark.alone]


def test_hifigan_tune_runs_as_shipped(tmp_path):
    assert_tuned_recipe_runs(REPO / "recipes" / "hifigan_tune.yaml", tmp_path / "run", max_size=0.40,
                             max_log_mel=0.10)
