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
    """The tests that start processes of their own (2 ranks, 2 nodes, worker pools) share one xdist group: with
    `--dist loadgroup` (scripts/test.sh) they run one after another on one worker, never two at once (4 busy processes
    on 2 cores slow both by half), and they come first, so that the other worker fills in around them."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable: the rest keep their order
