"""Suite-wide settings: which tests are slow (``pytest -m "not slow"`` skips them)."""

from __future__ import annotations

import pytest

#: Files whose every test starts real processes or trains for seconds: the slow ones.
SLOW_FILES = {
    "test_benchmarks_accuracy.py",
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
