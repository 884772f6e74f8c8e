"""Export and evaluate: standalone model files that plain torch runs, scored like the run did."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trgl_dist.checkpoints import files as ckpt
from trgl_dist.checkpoints import manifest
from trgl_dist.config import load_toml
from trgl_dist.evaluate import main as evaluate_main
from trgl_dist.export import choose_module
from trgl_dist.export import main as export_main
from trgl_dist.metrics.records import EvalRecord, read_records
from trgl_dist.network.models import InputSpec
from trgl_dist.network.modules import CutModel
from trgl_dist.training.build import build_network

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--model", "resnet-small", "--width", "8", "--modules", "3",
        "--regime", "parallel", "--max-steps", "4", "--batch-size", "16"]
RUN_EVAL_BATCH = "32"  # the run scored its test set in batches of 2 x --batch-size

# Runs in `python -I` from an empty directory, with trgl_dist forbidden: only torch loads it.
PLAIN_TORCH_LOADER = """
import sys
sys.modules["trgl_dist"] = None
try:
    import trgl_dist
except ImportError:
    pass
else:
    raise SystemExit("trgl_dist is importable")
import torch
path, fmt, inputs, outputs = sys.argv[1:5]
extra = {"trgl_dist.json": ""}
if fmt == "torch.export":
    model = torch.export.load(path, extra_files=extra).module()
else:
    model = torch.jit.load(path, _extra_files=extra)
with torch.no_grad():
    logits = [model(x) for x in torch.load(inputs, weights_only=True)]
assert not [name for name in sys.modules if name.startswith("trgl_dist.")]
meta = extra["trgl_dist.json"]
torch.save({"logits": logits, "meta": meta.decode() if isinstance(meta, bytes) else meta}, outputs)
"""


def _python(*args: str, timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _export(run: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    return _python("-m", "trgl_dist.export", str(run), "--output", str(output), *flags)


def _evaluate(path: Path, *flags: str) -> subprocess.CompletedProcess:
    return _python("-m", "trgl_dist.evaluate", str(path), *flags)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "R"
    done = _python("-m", "trgl_dist.train", *TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def _reference(run: Path, k: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """G_k then F_k built here from the run's config and checkpoint, independently of export."""
    step, meta = manifest.latest(run)
    modules, counts = build_network(load_toml(run / "config.toml"), InputSpec(3, 32, 10))
    assert counts == meta["blocks_per_module"]
    for index, module in enumerate(modules):
        module.load_state_dict(ckpt.load_module(run, step, index)["learner"]["module"])
    with torch.no_grad():
        return [CutModel(modules[:k]).eval()(x) for x in inputs]


def _load_in_plain_torch(path: Path, fmt: str, inputs: list[torch.Tensor], tmp: Path) -> dict:
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    torch.save(inputs, tmp / "inputs.pt")
    done = _python("-I", "-c", PLAIN_TORCH_LOADER, str(path), fmt, str(tmp / "inputs.pt"),
                   str(tmp / "outputs.pt"), cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    return torch.load(tmp / "outputs.pt", weights_only=True)


def _expected_module(run: Path, choice: str) -> int:
    if choice == "last":
        return 3
    if choice == "best":
        return json.loads((run / "summary.json").read_text())["best_module"] + 1
    return int(choice)


def _run_accuracy(run: Path, k: int) -> float:
    evals = [r for r in read_records(run / "metrics.jsonl")
             if isinstance(r, EvalRecord) and r.module == k - 1]
    return evals[-1].accuracy


@pytest.mark.parametrize("choice, fmt", [
    ("best", "auto"), ("last", "auto"), ("2", "auto"), ("2", "torchscript"),
])
def test_exported_module_runs_in_plain_torch_and_scores_as_the_run(run, tmp_path, choice, fmt):
    path = tmp_path / "m.pt2"
    done = _export(run, path, "--module", choice, "--format", fmt)
    assert done.returncode == 0, done.stderr
    k = _expected_module(run, choice)
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["module"] == k and sidecar["input"] == [3, 32, 32]
    assert sidecar["format"] == ("torchscript" if fmt == "torchscript" else "torch.export")

    inputs = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    loaded = _load_in_plain_torch(path, sidecar["format"], inputs, tmp_path)
    assert json.loads(loaded["meta"]) == sidecar
    assert [tuple(t.shape) for t in loaded["logits"]] == [(2, 10), (1, 10), (5, 10)]
    for got, want in zip(loaded["logits"], _reference(run, k, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    scored = _evaluate(path, "--dataset", "synthetic", "--batch-size", RUN_EVAL_BATCH, "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["samples"] == 256 and result["module"] == k
    assert abs(result["accuracy"] - _run_accuracy(run, k)) <= 1e-6


def test_best_falls_back_to_last_without_a_summary(run, tmp_path):
    assert choose_module("best", run, 3) == _expected_module(run, "best")
    assert choose_module("best", tmp_path, 3) == 3  # no summary.json there
    assert choose_module("last", run, 3) == 3 and choose_module("1", run, 3) == 1


def _assert_one_line_error(code: int, stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0]


def _fails(done: subprocess.CompletedProcess, needle: str) -> None:
    _assert_one_line_error(done.returncode, done.stderr, needle)


def _broken_copy(run: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    step = manifest.latest(copy)[0]
    first = ckpt.module_file(copy, step, 0)
    if how == "truncated":
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    elif how == "incomplete":
        (manifest.step_dir(copy, step) / manifest.MANIFEST).unlink()
    else:  # another model or K in the run's config than in its checkpoint
        config = (copy / "config.toml").read_text()
        old, new = how.split("->")
        (copy / "config.toml").write_text(config.replace(old, new))
    return copy


def test_truncated_module_file_fails_in_one_line(run, tmp_path):
    copy = _broken_copy(run, tmp_path, "truncated")
    _fails(_export(copy, tmp_path / "m.pt2"), "corrupted or truncated")
    assert not (tmp_path / "m.pt2").exists()


# The cheap refusals run in-process (main() is what the CLI runs).
@pytest.mark.parametrize("how, needle", [
    ("incomplete", "no complete checkpoint"),
    ("modules = 3->modules = 4", "modules=3"),
    ('name = "resnet-small"->name = "resnet110"', "model='resnet-small'"),
    ("width = 8->width = 16", "does not fit"),
])
def test_mismatched_or_incomplete_checkpoints_are_refused(run, tmp_path, capsys, how, needle):
    copy = _broken_copy(run, tmp_path, how)
    code = export_main([str(copy), "--output", str(tmp_path / "m.pt2")])
    _assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--module", "4"], "out of range"),
    (["--module", "0"], "out of range"),
    (["--module", "first"], "not best, last"),
    (["--step", "3"], "no complete checkpoint at step 3"),
    (["--output", "{tmp}/no/m.pt2"], "not writable"),
    (["--output", "{tmp}"], "is a directory"),
])
def test_bad_requests_are_refused(run, tmp_path, capsys, flags, needle):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    code = export_main([str(run), "--output", str(tmp_path / "m.pt2"), *flags])
    _assert_one_line_error(code, capsys.readouterr().err, needle)
    code = export_main([str(tmp_path / "nothing"), "--output", str(tmp_path / "m.pt2")])
    _assert_one_line_error(code, capsys.readouterr().err, "no such run directory")


def test_evaluate_refuses_other_inputs_and_broken_files(run, tmp_path, capsys):
    path = tmp_path / "m.pt2"
    assert _export(run, path, "--module", "1").returncode == 0
    _fails(_evaluate(path, "--dataset", "fashion-mnist"), "3x32x32 inputs")
    truncated = tmp_path / "t.pt2"
    truncated.write_bytes(path.read_bytes()[:1000])
    _assert_one_line_error(
        evaluate_main([str(truncated), "--dataset", "synthetic"]), capsys.readouterr().err,
        "corrupted or truncated",
    )
    _assert_one_line_error(
        evaluate_main([str(tmp_path / "none.pt2"), "--dataset", "synthetic"]),
        capsys.readouterr().err, "no such model file",
    )


def test_resnet110_with_four_modules_exports(tmp_path):
    run = tmp_path / "R"
    done = _python("-m", "trgl_dist.train", "--dataset", "synthetic", "--model", "resnet110",
                   "--modules", "4", "--regime", "parallel", "--max-steps", "1",
                   "--checkpoint-every", "1", "--batch-size", "8", "--synthetic-train", "16",
                   "--synthetic-test", "16",
                   "--out", str(run))
    assert done.returncode == 0, done.stderr
    path = tmp_path / "m.pt2"
    done = _export(run, path, "--module", "best")
    assert done.returncode == 0, done.stderr
    x = torch.randn(2, 3, 32, 32)
    loaded = _load_in_plain_torch(path, "torch.export", [x], tmp_path)
    k = _expected_module(run, "best")
    assert json.loads(loaded["meta"])["blocks"] == [14, 14, 13, 13][:k]
    assert tuple(loaded["logits"][0].shape) == (2, 10)
