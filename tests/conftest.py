"""Fixtures shared by the test files."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
