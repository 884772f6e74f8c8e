"""Suite-wide settings: NCCL's device rules on CPU, and which tests are slow."""

from __future__ import annotations

import os

import pytest

from trgl_dist.runtime import strict

# Every process the tests start (spawned ranks, torchrun's workers) inherits this: a tensor
# on a process group that NCCL would refuse fails the test here, not first on a GPU.
os.environ[strict.ENV] = "1"

#: Files whose every test starts real processes or trains for seconds: the slow ones.
SLOW_FILES = {
    "test_benchmarks_accuracy.py",
    "test_benchmarks_gpu.py",
    "test_benchmarks_memory.py",
    "test_benchmarks_overhead.py",
    "test_benchmarks_throughput.py",
    "test_distributed.py",
    "test_export.py",
    "test_link.py",
    "test_pipeline.py",
    "test_torchrun.py",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts real processes or trains for seconds (deselect: -m 'not slow')"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
