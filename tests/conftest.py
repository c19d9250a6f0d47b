import os
import sys

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it has to be set before any test
# imports kernels/: without a GPU the Triton kernels then run on CPU tensors in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under ./test.sh's workers (pytest-xdist, one per core) each test and each stage it starts gets one
# thread: a worker that took every core would slow the others more than it gains.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests import the stage scripts and packages from the repo root, as `python sft.py` would.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# transformers (the parity tests) imported once, beside this project's kernels/: see common.import_transformers
try:
    from common import import_transformers
    import_transformers()
except ImportError:
    pass  # not installed: the tests that need it skip


def pytest_collection_modifyitems(items):
    """The slowest test (the whole pipeline, minutes) first: with ./test.sh's workers (-n auto) it
    then runs beside all the others instead of after them."""
    items.sort(key=lambda item: "test_pipeline.py" not in item.nodeid)
