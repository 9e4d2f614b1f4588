import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per kind (`agentsd.testing.tiny_pipeline`), built when a test of the
    module first asks for it."""
    from agentsd.testing import tiny_pipeline

    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = tiny_pipeline(kind)
            built[kind].set_progress_bar_config(disable=True)
        return built[kind]

    return get
