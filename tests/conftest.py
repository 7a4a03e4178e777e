import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (the README's command): N test processes share the cores, so each computes with one
    # thread, and so do the runs it launches; several threads per process would fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from loop_trl.testing import save_tiny_stable_diffusion  # noqa: E402


def pytest_collection_modifyitems(items):
    """Longest first: tests marked ``slow(minutes=M)`` by M, then the other slow ones, then the rest (file
    order within each). Under `-n 2 --dist worksteal` the long learning run starts at once on one worker
    and the other works through everything else, instead of the long run starting last and running alone."""
    def rank(item):
        marker = item.get_closest_marker("slow")
        return (0, -marker.kwargs.get("minutes", 0)) if marker is not None else (1, 0)
    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny Stable Diffusion folder, saved once and loaded through from_pretrained by each test."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd_vpred_path(tmp_path_factory) -> str:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-v") / "pipeline", prediction_type="v_prediction")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
