"""Tests of the human report: report.md, its PNG plots and the console results table."""

from __future__ import annotations

from pathlib import Path

from tests.records import end, epoch, evaluation, train
from trgl_dist.metrics.failure import Failure
from trgl_dist.metrics.records import Record
from trgl_dist.metrics.report import format_console_report, write_report
from trgl_dist.metrics.summary import summarize

NUM_MODULES = 4


def train_records(epochs: int) -> list[Record]:
    records: list[Record] = []
    for e in range(epochs):
        for step in range(e * 5, e * 5 + 5):
            for module in range(NUM_MODULES):
                values = {
                    "loss": 2.0 - 0.1 * step + 0.01 * module,
                    "ce": 1.9 - 0.1 * step,
                    "transport": 0.5 / (step + 1),
                    "tau": 0.5 if module < 2 else 1.0,
                    "accuracy": 0.1 + 0.05 * step,
                }
                records.append(train(module, e, step, 32, stage=module // 2, **values))
        for module in range(NUM_MODULES):
            accuracy = 0.3 + 0.1 * e + 0.05 * module
            records.append(evaluation(module, e, accuracy, step=e * 5 + 4))
        records.append(epoch(e, e * 5 + 4, 3.0))
    return records


def end_record(stage: int) -> Record:
    return end(
        stage,
        busy=8.0,
        wait_in=1.0 * stage,
        wait_out=1.0 - stage,
        rate=32.0,
        samples=320,
        inbox_depth=1,
        bytes_sent=3 * 2**20,
        peak_rss_mb=300.0,
        peak_tensor_mb=20.0,
    )


def assert_pngs(run_dir: Path, names: set[str]) -> None:
    pngs = list((run_dir / "plots").glob("*.png"))
    assert {p.name for p in pngs} == names
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_pipeline_report_has_every_plot_and_both_tables(tmp_path: Path) -> None:
    records = train_records(epochs=3) + [end_record(0), end_record(1)]
    summary = summarize(records, regime="pipeline", num_modules=NUM_MODULES)
    report = write_report(tmp_path, records, summary)
    assert report == tmp_path / "report.md"
    assert_pngs(
        tmp_path,
        {
            "test_accuracy.png",
            "train_loss.png",
            "train_transport.png",
            "stage_time.png",
            "stage_memory.png",
        },
    )
    text = report.read_text()
    assert "# Training report (pipeline, 4 modules)" in text
    # Module 4 (1-based) ends best at 0.3 + 0.2 + 0.15 = 65%.
    assert "- best module: **4** (65.00%)" in text
    assert "| 4 | 1 | 65.00% | 65.00% |" in text
    # Stage 1: busy 8 s, waiting for input 1 s, for output 0 s -> 88.89% / 11.11% / 0.00%.
    assert "| 1 | 3-4 | 88.89% | 11.11% | 0.00% | 32.0 | 300.0 | 20.0 | - | 3.0 | - |" in text
    for png in ("test_accuracy", "train_loss", "stage_time", "stage_memory"):
        assert f"(plots/{png}.png)" in text


def test_a_report_without_stages_skips_the_stage_plots(tmp_path: Path) -> None:
    records = train_records(epochs=1)
    summary = summarize(records, regime="sequential", num_modules=NUM_MODULES)
    write_report(tmp_path, records, summary)
    # One epoch: final accuracies as bars; no stage records: the stage plots are skipped.
    assert_pngs(tmp_path, {"test_accuracy.png", "train_loss.png", "train_transport.png"})
    text = (tmp_path / "report.md").read_text()
    assert "## Per module" in text and "## Per stage" not in text


def test_report_with_no_records_at_all(tmp_path: Path) -> None:
    summary = summarize([], regime="e2e", num_modules=2)
    write_report(tmp_path, [], summary)
    assert list((tmp_path / "plots").iterdir()) == []
    assert "| 1 | - | - | - |" in (tmp_path / "report.md").read_text()


def test_report_states_the_failure(tmp_path: Path) -> None:
    records = train_records(epochs=1)
    failure = Failure(2, 2, "died", "stage 2 (rank 2) died")
    summary = summarize(records, regime="pipeline", num_modules=4, failure=failure)
    write_report(tmp_path, records, summary)
    assert "> **Run failed:** stage 2 (rank 2) died" in (tmp_path / "report.md").read_text()
    assert format_console_report(summary).splitlines()[-1] == "FAILED: stage 2 (rank 2) died"


def test_console_report_is_a_one_based_table_marking_the_best_module() -> None:
    records = train_records(epochs=2) + [end_record(0), end_record(1)]
    summary = summarize(records, regime="pipeline", num_modules=NUM_MODULES)
    lines = format_console_report(summary).splitlines()
    assert lines[0] == "Results (pipeline, 4 modules)"
    assert lines[1].split() == ["module", "test", "acc", "best", "acc"]
    assert lines[2].split() == ["1", "40.00%", "40.00%"]
    assert lines[5].split() == ["4", "55.00%", "55.00%", "<-", "best"]
    assert lines[6].startswith("last module: 55.00%   best module: 4 (55.00%)")
    assert lines[7] == "stage 0 (modules 1-2): busy 88.89%, waiting 11.11%, peak RSS 300.0 MB"


def test_the_cuda_peak_of_a_gpu_run_is_in_the_report_and_the_console(tmp_path: Path) -> None:
    records = train_records(epochs=1) + [end(0, cuda_peak_mb=1536.0), end(1, cuda_peak_mb=512.0)]
    summary = summarize(records, regime="pipeline", num_modules=NUM_MODULES)
    write_report(tmp_path, records, summary)
    text = (tmp_path / "report.md").read_text()
    assert "| CUDA peak (MB) |" in text and "| 1536.0 |" in text
    console = format_console_report(summary).splitlines()
    assert console[-2].endswith("peak RSS 100.0 MB, CUDA peak 1536.0 MB")
