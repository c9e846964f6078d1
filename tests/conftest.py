import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared helpers by name


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device: run `make test-gpu` on a GPU machine")
        for item in gpu_items:
            item.add_marker(skip)


settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("TANDEM_HYPOTHESIS_EXAMPLES", "400")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, stateful_step_count=40, deadline=None)
settings.load_profile(os.environ.get("TANDEM_HYPOTHESIS_PROFILE", "ci"))
