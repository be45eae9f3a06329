import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # tests/cases.py importable as `cases`

from cases import fresh_seed  # noqa: E402


@pytest.fixture
def seed():
    return fresh_seed()
