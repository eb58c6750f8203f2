import os
import sys
import tempfile
from pathlib import Path

# Never touch a user's cache or the network from the tests.
os.environ.setdefault("CMALIGN_CACHE", tempfile.mkdtemp(prefix="cmalign-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# One thread per test process: pytest-xdist runs two on two cores, and oversubscribed OpenMP
# threads slow torch down by an order of magnitude.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The tests marked `slow` (a minute or more) run first: pytest-xdist then hands them out while both workers are
    busy, instead of leaving one worker to finish a long test alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order
