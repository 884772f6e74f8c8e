"""Datasets: the Debian Fashion-MNIST, seeded balanced subsets, deterministic batches."""

import multiprocessing

import pytest
import torch

from trgl_dist import data
from trgl_dist.data import DataConfig
from trgl_dist.network.models import InputSpec


def test_balanced_subset_is_seeded_and_balanced():
    targets = torch.arange(10).repeat(50)
    a = data.balanced_subset(targets, 23, seed=1)
    assert torch.equal(a, data.balanced_subset(targets, 23, seed=1))
    assert not torch.equal(a, data.balanced_subset(targets, 23, seed=2))
    counts = torch.bincount(targets[a], minlength=10)
    assert counts.tolist() == [3, 3, 3] + [2] * 7
    with pytest.raises(data.DataError, match="larger than the training set"):
        data.balanced_subset(targets, 501, seed=0)


def test_synthetic_loader_batches_are_deterministic_and_carry_ids():
    train, test, spec = data.build_datasets(
        DataConfig(dataset="synthetic", synthetic_train=40), seed=3
    )
    assert spec == InputSpec(3, 32, 10) and len(train) == 40 and len(test) == 256

    def epoch(e):
        return list(data.make_loader(train, 16, train=True, seed=3, epoch=e))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert [len(b[1]) for b in first] == [16, 16, 8]  # the last batch is short
    for (x1, y1, i1), (x2, y2, i2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    assert not torch.equal(first[0][2], other[0][2])
    x, y, ids = first[0]
    assert torch.equal(train.targets[ids], y)


def test_fashion_mnist_from_the_debian_package(tmp_path):
    config = DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), train_size=1000)
    train, test, spec = data.build_datasets(config, seed=0)
    assert spec == InputSpec(1, 28, 10)
    assert len(train) == 1000 and len(test) == 10_000
    assert torch.bincount(train.targets).tolist() == [100] * 10
    x, y, i = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32


def _first_fashion_label(data_dir: str, queue) -> None:
    config = DataConfig(dataset="fashion-mnist", data_dir=data_dir, train_size=100)
    try:
        train, test, _ = data.build_datasets(config, seed=0)
        queue.put(("ok", int(train.targets.sum()), len(test)))
    except Exception as err:  # reported to the parent, which fails the test with it
        queue.put(("error", repr(err), 0))


def test_processes_staging_fashion_mnist_at_once_all_read_whole_files(tmp_path):
    # Every rank of a first run unpacks the Debian files into the same empty folder at once;
    # a reader must never see another process's half-written file.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_first_fashion_label, args=(str(tmp_path), queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r[0] for r in results] == ["ok"] * 4, results
    assert len({r[1:] for r in results}) == 1


def test_an_interrupted_unpack_leaves_no_truncated_file(tmp_path, monkeypatch):
    def killed_half_way(src, dst, length=0):
        dst.write(src.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(data.shutil, "copyfileobj", killed_half_way)
    config = DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), train_size=100)
    with pytest.raises(KeyboardInterrupt):
        data.build_datasets(config, seed=0)
    assert list((tmp_path / "FashionMNIST" / "raw").iterdir()) == []
    monkeypatch.undo()
    train, _, _ = data.build_datasets(config, seed=0)
    assert len(train) == 100


def test_a_truncated_dataset_file_is_one_clear_error(tmp_path):
    config = DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), train_size=100)
    data.build_datasets(config, seed=0)
    images = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    whole = images.read_bytes()
    for kept in (2, 16, len(whole) // 2):  # cut in the header, after it, in the pixels
        images.write_bytes(whole[:kept])
        with pytest.raises(data.DataError, match="cannot be read.*delete that folder"):
            data.build_datasets(config, seed=0)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(data.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(data.DataError, match="apt-get install -y dataset-fashion-mnist"):
        data.build_datasets(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)


def test_val_split_is_held_out_of_training_and_replaces_the_test_set():
    config = DataConfig(dataset="synthetic", synthetic_train=400, val_size=50, train_size=100)
    train, val, _ = data.build_datasets(config, seed=0)
    assert len(train) == 100 and len(val) == 50
    full = data.synthetic(400, data.InputSpec(3, 32, 10), seed=1234)[0]
    train_rows = {full_row.numpy().tobytes() for full_row in train.images}
    assert not any(row.numpy().tobytes() in train_rows for row in val.images)
    assert any(torch.equal(val.images[0], row) for row in full)


def test_crop_flip_is_a_shift_or_mirror_drawn_from_the_generator():
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4)
    crop = data.CropFlip(4, 1, flip=False, finish=lambda x: x)
    outs = {crop(image, torch.Generator().manual_seed(s)).numpy().tobytes() for s in range(40)}
    assert len(outs) == 9  # 3x3 possible offsets of a 1-pixel padding
    centred = [s for s in range(40)
               if torch.equal(crop(image, torch.Generator().manual_seed(s)), image)]
    assert centred  # offset (1, 1) gives the image back
    flip = data.CropFlip(4, 0, flip=True, finish=lambda x: x)
    seen = {flip(image, torch.Generator().manual_seed(s)).numpy().tobytes() for s in range(20)}
    assert seen == {image.numpy().tobytes(), image.flip(-1).numpy().tobytes()}


def test_eval_size_takes_a_seeded_balanced_part_of_the_test_or_validation_set():
    config = DataConfig(dataset="synthetic", synthetic_train=400, synthetic_test=300, eval_size=50)
    _, test, _ = data.build_datasets(config, seed=0)
    _, again, _ = data.build_datasets(config, seed=0)
    assert len(test) == 50 and torch.equal(test.targets, again.targets)
    assert torch.bincount(test.targets, minlength=10).tolist() == [5] * 10
    val = DataConfig(dataset="synthetic", synthetic_train=400, val_size=100, eval_size=30)
    assert len(data.build_datasets(val, seed=0)[1]) == 30
    too_many = DataConfig(dataset="synthetic", synthetic_test=40, eval_size=41)
    with pytest.raises(data.DataError, match="--eval-size 41 is larger than the test set"):
        data.build_datasets(too_many, seed=0)


def test_synthetic_test_split_shares_the_training_classes(tmp_path):
    # A model trained on the synthetic training split must score far above chance (10%)
    # on its test split: both come from the same class patterns.
    from trgl_dist.metrics.records import read_records
    from trgl_dist.train import main

    out = tmp_path / "r"
    args = ["--dataset", "synthetic", "--synthetic-train", "512", "--synthetic-test", "200",
            "--model", "resnet-small", "--width", "8", "--modules", "2", "--regime", "parallel",
            "--batch-size", "32", "--epochs", "2", "--lr", "0.05", "--out", str(out)]
    assert main(args) == 0
    final = [r for r in read_records(out / "metrics.jsonl") if r.kind == "eval"][-1]
    assert final.accuracy > 0.5  # chance: 0.1; 0.77-0.9 seen on different CPUs
