import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tests/cases.py importable as `cases`

from cases import fresh_seed  # noqa: E402

# Property-based fuzzing (hypothesis). The default profile keeps the suite fast on 2 cores; run
# `python -m pytest --hypothesis-profile=long tests/test_fuzz_*.py` for a deep search. No deadline:
# timings on shared CI machines are noise, and the Triton interpreter is slow by nature.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("default")


@pytest.fixture
def seed():
    return fresh_seed()


def pytest_configure(config):
    # Without a GPU the Triton kernels run in Triton's interpreter; it is read when kernels are
    # decorated, so it must be set before any test module imports them.
    import os

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """A test (or a command it runs) must not leave autograd switched off for the tests after it."""
    import torch
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch.is_grad_enabled() == False"
