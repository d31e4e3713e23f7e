"""Fixtures shared by the test files."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# As the suite found them when it started (unset, unless the suite itself runs under a launcher).
PROCESS_GROUP_ENVIRONMENT = {k: os.environ.get(k) for k in PROCESS_GROUP_VARIABLES}


@pytest.fixture(scope="module", autouse=True)
def process_group_variables_as_the_suite_started():
    """After each test file, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT as the suite found them.

    A test file that builds engines in this process exports them (``init_distributed`` with no
    launcher; DeepSpeed reads LOCAL_RANK at every engine it builds, so they stay for the file), and
    its process group keeps MASTER_PORT bound. A test of a later file in the same process that starts
    a trainer with a copy of this environment would otherwise make that trainer open a one-rank
    group at a port already in use (EADDRINUSE), depending on which files ran before it in that
    process: with the suite spread over workers, on the order they happen to get. The group of this
    process stays initialised, so the next file's engine does not read the port again."""
    yield
    for k, v in PROCESS_GROUP_ENVIRONMENT.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo dataset (64-pixel scenes, two train shards: one per rank), read-only for tests."""
    from vlbert.demo.make_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, train_shards=2, per_shard=16, val=8, size=64, book_files=1, docs_per_file=20, wiki_docs=20)
    return root


@pytest.fixture(scope="session")
def vqa(tmp_path_factory) -> Path:
    """A tiny VQA set on demo scenes (8 train, 8 val questions), read-only for tests."""
    from vlbert.demo.make_vqa import make_demo_vqa

    root = tmp_path_factory.mktemp("vqa")
    make_demo_vqa(root, train_questions=8, val_questions=8, seed=0)
    return root


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread in this process for the test, as the trainer subprocesses of the
    tests run (OMP_NUM_THREADS=1). For training in this process beside DataLoader worker processes:
    on 2 cores, the pool's spinning threads and the workers slow each other down, 3x in 12 tiny steps
    with 2 workers on a busy machine (74 s with 2 threads, 24 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The files that take longest, in that order, ahead of the rest (measured: docs/development.md).
# scripts/test.sh spreads the suite over worker processes a file at a time, in collection order
# (--no-loadscope-reorder: by default pytest-xdist sends the files with most tests first), and the
# run ends when its last file does: the demo end to end alone is about a third of the suite, so
# it starts first, not after every other file.
LONGEST_FIRST = ("test_demo_e2e.py", "test_slurm.py", "test_elastic_train.py", "test_train_e2e.py")


def pytest_collection_modifyitems(config, items):
    """Moves the LONGEST_FIRST files to the front; every other test keeps its place (a stable sort)."""
    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
