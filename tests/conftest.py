"""Shared test settings: CUDA tests run only where onnxruntime offers the CUDA provider."""

from __future__ import annotations

import onnxruntime as ort
import pytest

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="onnxruntime's CUDAExecutionProvider is not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared machine: one torch thread is faster than two fighting for cores
    (torch imported here only by the tests that ask for this fixture)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
