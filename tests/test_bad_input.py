"""Nothing a user can type or put in a file ends in a traceback: one line naming the problem,
and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torchvision.utils import save_image

from trgl_dist.train import main

SYNTHETIC = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "32",
             "--model", "resnet-small", "--width", "8", "--batch-size", "16", "--max-steps", "2"]

BAD_FLAGS = [
    (["--momentum", "-1"], "optim.momentum must be a finite number in [0, 1)"),
    (["--momentum", "nan"], "optim.momentum must be a finite number"),
    (["--momentum", "1"], "optim.momentum must be a finite number in [0, 1)"),
    (["--seed", "99999999999999999999999"], "train.seed must be at most 2**63 - 1"),
    (["--seed", "-1"], "train.seed must be >= 0"),
    (["--synthetic-train", "0"], "data.synthetic_train must be >= 1"),
    (["--synthetic-train", "-5"], "data.synthetic_train must be >= 1"),
    (["--image-size", "-5"], "data.image_size must be >= 0"),
    (["--tau", "inf"], "method.tau must be a finite number > 0"),
    (["--tau", "nan"], "method.tau must be a finite number"),
    (["--tau", "0"], "method.tau must be a finite number > 0"),
    (["--tau-schedule", "list", "--tau-values", "1,inf,1"], "method.tau_values"),
    (["--lr", "-0.1"], "optim.lr must be a finite number >= 0"),
    (["--lr", "inf"], "optim.lr must be a finite number"),
    (["--weight-decay", "nan"], "optim.weight_decay"),
    (["--label-smoothing", "1"], "method.label_smoothing"),
    (["--multiplier-h", "nan"], "method.multiplier_h"),
    (["--coordinator", "tcp://127.0.0.1:99999"], "PORT in 0..65535"),
    (["--coordinator", "localhost:5555"], "is not tcp://HOST:PORT"),
    (["--link-timeout", "0"], "pipeline.link_timeout"),
    (["--modules", "0"], "model.modules must be >= 1"),
    (["--modules", "two"], "model.modules: cannot read 'two' as int"),
    (["--batch-size", "0"], "data.batch_size must be >= 1"),
    (["--epochs", "-1"], "train.epochs must be >= 0"),
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--method", "magic"], "method.name: 'magic' is not one of"),
    (["--split", "sideways"], "model.split: 'sideways' is not one of"),
    (["--modules", "3", "--split-counts", "1,2"], "model.split_counts has 2 entries for 3"),
    (["--split-counts", "0,9,0,0"], "model.split_counts must be >= 1"),
    (["--workers", "-2"], "data.workers must be >= -1"),
    (["--buffer-size", "0"], "pipeline.buffer_size must be >= 1"),
    (["--dataset", "imagenet"], "data.dataset: 'imagenet' is not one of"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--train-size", "999999"], "--train-size 999999 is larger than the training set"),
    (["--eval-size", "999999"], "--eval-size 999999 is larger than the test set"),
    (["--val-size", "-1"], "data.val_size must be >= 0"),
    (["--regime", "async"], "train.regime: 'async' is not one of"),
    (["--modules", "100"], "cannot split 9 blocks of resnet-small into 100 modules"),
    (["--resume-step", "4"], "--resume-step needs --resume RUN_DIR"),
    (["--augment", "5"], "data.augment: cannot read '5' as bool"),
    (["--plan", "fastest"], "pipeline.plan: 'fastest' is not one of"),
    (["--plan", "auto", "--stage-replicas", "2"], "pipeline.plan auto chooses"),
    (["--stage-replicas", "0"], "pipeline.stage_replicas / stage_modules must be >= 1"),
    (["--modules", "4", "--stage-modules", "1,2"], "pipeline.stage_modules [1, 2] sums to 3"),
    (["--accumulate", "2", "--regime", "sequential"], "the sequential regime steps every batch"),
    (["--accumulate", "2", "--method", "multipliers", "--regime", "parallel"],
     "the multipliers update lambda every batch"),
    (["--stage-replicas", "2", "--buffer-policy", "replay"], "replay needs one replica"),
]


def one_error_line(capfd: pytest.CaptureFixture[str], code: int, expected: str) -> None:
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and expected in errors[0], err


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS)
def test_a_bad_flag_is_one_line(tmp_path, capfd, flags, expected):
    assert len(BAD_FLAGS) >= 30
    code = main([*SYNTHETIC, "--out", str(tmp_path / "r"), *flags])
    one_error_line(capfd, code, expected)


BAD_FILES = [
    ("binary.toml", bytes(range(256)), "is not a UTF-8 text file"),
    ("broken.toml", b"[model\n", "is not valid TOML"),
    ("bool.toml", b"[data]\naugment = 5\n", "data.augment: 5 is not true or false"),
    ("string.toml", b"[train]\nepochs = \"3\"\n", "train.epochs: '3' is not a int"),
    ("schema.toml", b'schema_version = "1"\n', "schema_version must be an integer"),
    ("future.toml", b"schema_version = 9\n", "written with config schema 9"),
    ("section.toml", b"[trainer]\nepochs = 3\n", "unknown config section 'trainer'"),
    ("key.toml", b"[model]\ndepth = 3\n", "unknown config key model.depth"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES)
def test_a_bad_config_file_is_one_line(tmp_path, capfd, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    code = main([*SYNTHETIC, "--config", str(path), "--out", str(tmp_path / "r")])
    one_error_line(capfd, code, expected)


def test_a_missing_config_file_and_a_binary_config_of_a_run_are_one_line(tmp_path, capfd):
    code = main(["--config", str(tmp_path / "nowhere.toml")])
    one_error_line(capfd, code, "cannot read config file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_bytes(b"\x00\xff" * 50)
    code = main(["--resume", str(run)])
    one_error_line(capfd, code, "is not a UTF-8 text file")


def test_an_unwritable_run_directory_is_one_line(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main([*SYNTHETIC, "--out", str(blocker / "run")])
    one_error_line(capfd, code, "train.out: cannot write in run directory")


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line(tmp_path):
    # root writes through file permissions: a read-only file system is what stops it
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "trgl_dist.train", *SYNTHETIC, "--out", str(mount)],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: train.out: cannot write in run directory {mount}: Read-only file system"
    ]


def test_a_corrupt_image_in_an_imagefolder_is_named(tmp_path, capfd):
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                save_image(torch.rand(3, 8, 8), folder / f"{i}.png")
    broken = tmp_path / "images" / "train" / "dog" / "2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    code = main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
                 "--image-size", "8", "--model", "resnet-small", "--width", "4",
                 "--modules", "2", "--batch-size", "16", "--max-steps", "2",
                 "--out", str(tmp_path / "r")])
    one_error_line(capfd, code, f"{broken}: cannot be read as an image")
