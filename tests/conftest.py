"""Session setup and fixtures; the helpers the tests import live in tests/helpers/."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from helpers import ARCHS, tiny_model

torch.set_num_threads(1)  # tiny models: threads only add synchronisation overhead
# the adaptive policy caches measured cost curves on disk: keep the tests' away from the user's
os.environ["SPECDECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="specdecode-test-cache-")


def pytest_make_parametrize_id(config, val, argname):
    """torch dtypes by name in test ids (``[bfloat16]``, not ``[dtype1]``): ``-k`` can pick them."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models(arch):
    """(target, unrelated draft model of the same vocabulary) for one architecture."""
    return tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1)


@pytest.fixture(autouse=True)
def _keep_onednn_cap():
    """Commands that lift the AMX cap (training: ``models.cpu.allow_amx``) change the process's
    environment; each test leaves it as it found it."""
    before = os.environ.get("ONEDNN_MAX_CPU_ISA")
    yield
    if before is None:
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
    else:
        os.environ["ONEDNN_MAX_CPU_ISA"] = before
