"""Checkpoints: complete or ignored, exact resume, clear refusals, nothing lost on failure."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launcher import our_output, rank_process, torchrun
from trgl_dist.checkpoints import files as ckpt
from trgl_dist.checkpoints import manifest
from trgl_dist.train import main

SMALL = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8",
         "--batch-size", "16", "--modules", "3"]


def _params(run_dir, step):
    out = {}
    for k in range(manifest.read_manifest(run_dir, step)["modules"]):
        learner = ckpt.load_module(run_dir, step, k)["learner"]
        out.update({f"{k}.{name}": t for name, t in learner["module"].items()})
        out.update({f"{k}.opt": learner["optimizer"]["state"]})
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".opt"):
            for p in a[key]:
                torch.testing.assert_close(a[key][p], b[key][p], rtol=0, atol=0)
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_manifest_is_written_last_and_old_checkpoints_are_pruned(tmp_path):
    meta = {"modules": 2, "model": "m"}
    ckpt.save_module(tmp_path, 5, 0, {"learner": {}})
    with pytest.raises(manifest.CheckpointError, match="missing"):
        manifest.write_manifest(tmp_path, 5, meta)
    assert manifest.latest(tmp_path) is None  # a step without manifest does not count
    for step in (5, 10, 15):
        for module in (0, 1):
            ckpt.save_module(tmp_path, step, module, {"learner": {}})
        manifest.write_manifest(tmp_path, step, meta, keep=2)
    assert manifest.complete_steps(tmp_path) == [10, 15]
    assert manifest.latest(tmp_path)[1]["step"] == 15
    with pytest.raises(manifest.CheckpointError, match="modules=4"):
        manifest.check_compatible({"step": 15, "modules": 3}, {"modules": 4})


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["parallel", "e2e", "multilap"])
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, regime):
    args = [*SMALL, "--regime", regime, "--checkpoint-every", "3", "--synthetic-train", "96"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*args, "--epochs", "2", "--out", str(straight)]) == 0
    assert main([*args, "--epochs", "1", "--out", str(split)]) == 0
    assert main(["--resume", str(split), "--epochs", "2"]) == 0
    final = manifest.latest(straight)[0]
    assert manifest.latest(split)[0] == final
    _assert_same(_params(straight, final), _params(split, final))


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "trgl_dist.train", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_corrupted_or_mismatched_checkpoints_are_refused_in_one_line(tmp_path):
    run = tmp_path / "r"
    assert main([*SMALL, "--max-steps", "2", "--out", str(run)]) == 0
    step = manifest.latest(run)[0]
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config.replace("modules = 3", "modules = 2"))
    other = _cli("--resume", str(run))
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: checkpoint step {step} was written with modules=3, this run has modules=2"
    ]
    (run / "config.toml").write_text(config)
    path = ckpt.module_file(run, step, 0)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    broken = _cli("--resume", str(run))
    assert broken.returncode == 2
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be loaded (corrupted or truncated?)" in lines[0]
    nothing = _cli("--resume", str(tmp_path / "nowhere"))
    assert nothing.returncode == 2 and "no config.toml" in nothing.stderr


@pytest.mark.slow
def test_nan_loss_stops_naming_module_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "r"
    result = _cli(*SMALL, "--lr", "1e12", "--epochs", "20", "--checkpoint-every", "1",
                  "--out", str(run))
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "module" in line and "loss is" in line and "at step" in line
    good = manifest.latest(run)
    assert good is not None
    ckpt.load_module(run, good[0], 0)  # loadable


def _wait_for_manifest(run_dir, deadline_s=120):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if manifest.complete_steps(run_dir):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigkilled_single_process_run_resumes_to_the_end(tmp_path):
    run = tmp_path / "r"
    args = [*SMALL, "--regime", "parallel", "--max-steps", "40", "--checkpoint-every", "5",
            "--synthetic-train", "1024"]
    proc = subprocess.Popen([sys.executable, "-m", "trgl_dist.train", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_manifest(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert manifest.latest(run)[0] < 40
    resumed = _cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert manifest.latest(run)[0] == 40


@pytest.mark.slow
def test_sigkilled_pipeline_resumes_and_matches_an_uninterrupted_run(tmp_path):
    args = [*SMALL, "--max-steps", "36", "--checkpoint-every", "4", "--synthetic-train", "2048"]
    straight = torchrun(2, [*args, "--out", str(tmp_path / "straight")])
    assert straight.code == 0, straight.output
    run = tmp_path / "run"
    killed: list[int] = []

    def kill_after_first_manifest(launcher, _elapsed):
        if not manifest.complete_steps(run):
            return False
        victim = rank_process(launcher, 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        killed.append(manifest.complete_steps(run)[-1])
        return True

    first = torchrun(2, [*args, "--out", str(run)], during=kill_after_first_manifest)
    assert killed and first.code != 0
    assert first.survivors() == []
    resumed = torchrun(2, ["--resume", str(run)])
    assert resumed.code == 0, resumed.output
    last = manifest.latest(run)[0]
    assert last == 36 == manifest.latest(tmp_path / "straight")[0]
    _assert_same(_params(tmp_path / "straight", 36), _params(run, 36))


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m"):
    """A tmpfs of ``size`` at ``path``: a disk that fills up a few checkpoints in."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


FILLS_A_DISK = [*SMALL, "--synthetic-train", "2048", "--epochs", "3", "--checkpoint-every", "2",
                "--keep-checkpoints", "0"]


def _assert_full_disk_handled(run, output, code):
    assert code not in (0, 2), output
    assert "Traceback" not in our_output(output), output
    lines = [ln for ln in output.splitlines() if "No space left on device" in ln]
    assert len(lines) == 1 and str(run) in lines[0], output
    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    step = manifest.latest(run)[0]  # the last complete checkpoint is intact
    for module in range(manifest.read_manifest(run, step)["modules"]):
        ckpt.load_module(run, step, module)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        result = _cli(*FILLS_A_DISK, "--out", str(run))
        _assert_full_disk_handled(run, result.stderr, result.returncode)


@pytest.mark.slow
def test_a_full_disk_stops_a_pipeline_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        launch = torchrun(2, [*FILLS_A_DISK, "--out", str(run)])
        assert launch.survivors() == []
        _assert_full_disk_handled(run, launch.output, launch.code)


@pytest.mark.slow
def test_a_corrupt_module_file_is_named_by_its_rank_with_the_newest_intact_step(tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--max-steps", "8", "--checkpoint-every", "2", "--synthetic-train", "256",
            "--keep-checkpoints", "0"]
    assert torchrun(2, [*args, "--out", str(run)]).code == 0
    newest = manifest.latest(run)[0]
    broken = ckpt.module_file(run, newest, 2)  # module 3: stage 1's
    broken.write_bytes(broken.read_bytes()[:2000])
    launch = torchrun(2, ["--resume", str(run)])
    assert launch.code != 0
    errors = [ln for ln in our_output(launch.output).splitlines() if ln.startswith("error:")]
    older = manifest.complete_steps(run)[-2]
    assert errors == [
        f"error: {broken}: cannot be loaded (corrupted or truncated?): "
        + errors[0].split("truncated?): ", 1)[1].split("; the newest")[0]
        + f"; the newest intact checkpoint is step {older}: continue from it with "
        f"--resume {run} --resume-step {older}"
    ], launch.output
    assert "module-0.pt" not in launch.output
    resumed = torchrun(2, ["--resume", str(run), "--resume-step", str(older)])
    assert resumed.code == 0, resumed.output
    assert manifest.latest(run)[0] == 8


def test_incomplete_step_directories_older_than_the_newest_checkpoint_are_pruned(tmp_path):
    meta = {"modules": 1, "model": "m"}
    ckpt.save_module(tmp_path, 3, 0, {"learner": {}})  # a save cut short: no manifest
    for step in (2, 5):
        ckpt.save_module(tmp_path, step, 0, {"learner": {}})
    ckpt.save_module(tmp_path, 9, 0, {"learner": {}})  # newer, in progress: kept
    manifest.write_manifest(tmp_path, 2, meta)
    assert manifest.step_directories(tmp_path) == [2, 3, 5, 9]
    manifest.write_manifest(tmp_path, 5, meta)
    assert manifest.step_directories(tmp_path) == [2, 5, 9]
    assert manifest.complete_steps(tmp_path) == [2, 5]


class Foreign:
    """Any class of someone else's: weights-only loading must not unpickle it."""


def test_a_foreign_pickle_is_refused_without_torchs_advice_to_unpickle_it(tmp_path):
    path = ckpt.module_file(tmp_path, 1, 0)
    path.parent.mkdir(parents=True)
    torch.save({"learner": Foreign()}, path)
    with pytest.raises(manifest.CheckpointError) as caught:
        ckpt.load_module(tmp_path, 1, 0)
    message = str(caught.value)
    assert "not a trgl_dist checkpoint" in message and "weights_only" not in message
    assert len(message.splitlines()) == 1


def test_a_signal_while_loading_is_not_taken_for_corruption(tmp_path, monkeypatch):
    from trgl_dist.runtime.pipeline import Interrupted

    ckpt.save_module(tmp_path, 1, 0, {"learner": {}})

    def interrupted(*args, **kwargs):
        raise Interrupted("stopped by SIGTERM")

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(Interrupted):
        ckpt.load_module(tmp_path, 1, 0)
