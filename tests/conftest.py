"""Session setup and fixtures; the helpers the tests import live in tests/helpers/."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from helpers import ARCHS, tiny_model

import specdecode as sd

torch.set_num_threads(1)  # tiny models: threads only add synchronisation overhead
# the adaptive policy caches measured cost curves on disk: keep the tests' away from the user's
os.environ["SPECDECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="specdecode-test-cache-")
# Tests of drafters and rules check that drafts flow and are verified exactly, so they run with the
# fixed policy whatever the library default (on tiny random models adaptive rightly turns most
# drafting off). Every policy has its own tests: test_policies.py, and the policy rows
# of test_greedy_equivalence.py and test_sampling.py, which name their policy explicitly.
sd.api.DEFAULT_POLICY = "fixed"


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models(arch):
    """(target, unrelated draft model of the same vocabulary) for one architecture."""
    return tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1)
