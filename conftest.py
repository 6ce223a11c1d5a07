"""Shared test setup: import path, the fast profile, one trained smoke model for the whole test run."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The kernel nbval starts inherits pytest's environment: this selects the seconds-long profile for
# the notebooks as well. An explicit GRIDJEPA_PROFILE from the caller wins.
os.environ.setdefault("GRIDJEPA_PROFILE", "smoke")

# One intra-op thread for the test process (not for notebook kernels). On the 2-core CI/dev machine,
# with anything else busy, torch's 2 spinning OpenMP threads made a smoke training run ~10x slower
# (measured: 50 s with 2 threads vs 5 s with 1). Override with GRIDJEPA_TEST_THREADS=N.
torch.set_num_threads(int(os.environ.get("GRIDJEPA_TEST_THREADS", "1")))

import gridjepa_utils as gj  # noqa: E402  (needs the path above)


@pytest.fixture(scope="session")
def smoke_cfg():
    """The smoke profile's Config (30 steps on 4,000 transitions)."""
    return gj.make_config("smoke")


@pytest.fixture(scope="session")
def smoke_run(smoke_cfg):
    """One uninterrupted smoke training run, shared by every test that needs a trained model.

    Tests must not modify its weights; they may put it in eval mode (every planner does).
    """
    return gj.train(smoke_cfg, progress=False, device="cpu")


@pytest.fixture(scope="session")
def open_world():
    """The open 5x5 world (its atlas is rendered once and cached on the instance)."""
    return gj.World(5)
