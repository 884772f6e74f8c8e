"""Datasets through torchvision's classes, seeded subsets, and deterministic loaders."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

from trgl_dist.errors import ConfigError, DataError, first_line
from trgl_dist.network.models import InputSpec
from trgl_dist.sections import setting

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# (mean, std) per channel, and whether horizontal flips keep the label meaningful.
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,), True),
    "mnist": ((0.1307,), (0.3081,), False),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), True),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
}
#: Sample shape and classes of every dataset but imagefolder (whose folder decides them).
SPECS = {
    "fashion-mnist": InputSpec(channels=1, size=28, num_classes=10),
    "mnist": InputSpec(channels=1, size=28, num_classes=10),
    "cifar10": InputSpec(channels=3, size=32, num_classes=10),
    "cifar100": InputSpec(channels=3, size=32, num_classes=100),
    "stl10": InputSpec(channels=3, size=96, num_classes=10),
    "synthetic": InputSpec(channels=3, size=32, num_classes=10),
}


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = setting("fashion-mnist", f"Dataset: {', '.join(DATASETS)}.")
    data_dir: str = setting("", "Folder of the datasets; empty: ~/.cache/trgl_dist/data.")
    train_size: int = setting(
        0, "Train on a seeded, class-balanced subset of this many samples (0: all)."
    )
    val_size: int = setting(
        0, "Hold out this many training samples and score on them instead of the test set."
    )
    eval_size: int = setting(
        0, "Score a seeded, class-balanced subset of this many test (or validation) samples "
        "(0: all)."
    )
    batch_size: int = setting(128, "Training batch size, in samples (the test pass uses twice).")
    augment: bool = setting(True, "Random crop and flip of the training images.")
    image_size: int = setting(0, "Imagefolder only: image side in pixels (0: 224).")
    workers: int = setting(
        -1,
        "Data-loader worker processes, kept across epochs (0: load in the training process; "
        "-1: 2 on GPU, 0 on CPU).",
    )
    synthetic_train: int = setting(512, "Synthetic dataset: training samples.")
    synthetic_test: int = setting(256, "Synthetic dataset: test samples.")

    def validate(self) -> None:
        """Reject impossible values with one message naming the key."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset: {self.dataset!r} is not one of {', '.join(DATASETS)}")
        for key, minimum in (
            ("train_size", 0),
            ("val_size", 0),
            ("eval_size", 0),
            ("image_size", 0),
            ("batch_size", 1),
            ("workers", -1),
            ("synthetic_train", 1),
            ("synthetic_test", 1),
        ):
            value = getattr(self, key)
            if not minimum <= value < 2**63:
                raise ConfigError(f"data.{key} must be >= {minimum}, got {value}")


class IndexedImages(Dataset):
    """In-memory uint8 images (N, C, H, W) yielding (image, label, sample id).

    Items are asked for by (epoch, sample id): the augmentation is seeded per (seed, epoch,
    sample id), so a batch is the same whatever process, worker or resumed run draws it,
    and a loader's workers need no word from the main process when an epoch begins.
    """

    def __init__(self, images_NCHW: Any, targets: Tensor, transform: Callable, seed: int):
        self.images, self.targets, self.transform = images_NCHW, targets.long(), transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        """Sample ``key`` = (epoch, id), or an id alone for epoch 0."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFFFFFF)
        return self.transform(self.images[index], generator), self.targets[index], index


class CropFlip:
    """The standard small-image augmentation (random crop of a zero-padded image, random
    horizontal flip), its randomness drawn from the generator it is given. torchvision's
    functional ops do the work; only the parameters are drawn here, since torchvision's
    random transforms can only use the global RNG, whose reseeding is slow."""

    def __init__(self, size: int, padding: int, flip: bool, finish: Callable) -> None:
        self.size, self.padding, self.flip, self.finish = size, padding, flip, finish

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        if self.padding:
            image = v2.functional.pad(image, [self.padding] * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=generator).tolist()
        image = v2.functional.crop(image, top, left, self.size, self.size)
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image = v2.functional.horizontal_flip(image)
        return self.finish(image)


class GlobalSeeded:
    """A torchvision transform run under the global RNG, reseeded from the generator."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            return self.transform(image)


def _transforms(name: str, size: int, train: bool, augment: bool) -> Callable:
    mean, std, flip = STATS[name]
    finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    if train and augment:
        return CropFlip(size, size // 8, flip, finish)
    return lambda image, _generator: finish(image)


def _fashion_mnist_root(root: Path) -> Path:
    """Stage the Debian package's IDX files under root/FashionMNIST/raw when present."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in FASHION_FILES):
        return root
    if all((DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for f in FASHION_FILES:
            _unpack_once(DEBIAN_FASHION_MNIST / f"{f}.gz", raw / f)
        log.info("using Fashion-MNIST from %s", DEBIAN_FASHION_MNIST)
    return root


def _unpack_once(archive: Path, target: Path) -> None:
    """Decompress ``archive`` to ``target`` through a private temporary file and a rename.

    Several processes stage the files at once (every rank of a first run, the workers of a
    benchmark): each writes its own copy and renames it into place, so a reader sees either
    no file or a whole one, never another process's half-written file, and a process killed
    while unpacking leaves no truncated file behind.
    """
    if target.exists():
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with gzip.open(archive, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _download_hint(name: str, root: Path) -> str:
    if name == "fashion-mnist":
        return (
            f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} nor {root}, and it could not be "
            "downloaded: run `apt-get install -y dataset-fashion-mnist`, or connect to the "
            "internet so torchvision can download it"
        )
    return (
        f"dataset {name} not found in {root} and it could not be downloaded: connect to the "
        f"internet so torchvision can download it, or pass --data-dir to where it is"
    )


#: The folder under the data directory that torchvision's class of each dataset reads.
TORCHVISION_FOLDERS = {
    "fashion-mnist": "FashionMNIST",
    "mnist": "MNIST",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}
# How torchvision's readers fail on a truncated or foreign file.
_UNREADABLE = (RuntimeError, OSError, ValueError, EOFError, IndexError, AssertionError)


def _load_torchvision(name: str, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """Images as uint8 (N, C, H, W) and labels, from torchvision's own dataset classes."""
    if name == "fashion-mnist":
        root = _fashion_mnist_root(root)
    kinds: dict[str, Callable] = {
        "fashion-mnist": datasets.FashionMNIST,
        "mnist": datasets.MNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }
    folder = root / TORCHVISION_FOLDERS[name]
    was_there = folder.is_dir() and any(folder.rglob("*"))
    try:
        if name == "stl10":
            ds = datasets.STL10(str(root), split="train" if train else "test", download=True)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        ds = kinds[name](str(root), train=train, download=True)
    except _UNREADABLE as err:
        if not was_there:
            raise DataError(_download_hint(name, root)) from err
        raise DataError(
            f"{name}: the files in {folder} cannot be read ({first_line(err)}); a truncated or "
            "foreign file? delete that folder to fetch them again"
        ) from err
    data = ds.data if isinstance(ds.data, Tensor) else torch.from_numpy(ds.data)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(ds.targets).long()


#: Seed of the synthetic class patterns: training and test samples share them.
SYNTHETIC_PATTERNS_SEED = 97


def synthetic(n: int, spec: InputSpec, seed: int) -> tuple[Tensor, Tensor]:
    """Learnable random data: a smooth pattern per class plus noise, as uint8 images.

    The patterns are the same for every ``seed``: samples drawn with two seeds (the training
    and the test split) come from one class-conditional distribution, so a model that
    learned the training split scores well on the test split.
    """
    patterns_rng = torch.Generator().manual_seed(SYNTHETIC_PATTERNS_SEED)
    coarse = torch.rand(spec.num_classes, spec.channels, 4, 4, generator=patterns_rng)
    coarse = (coarse + coarse.flip(-1)) / 2  # mirror-symmetric: a flipped sample is the same
    # Smooth: a crop shifted by a few pixels still shows its class's pattern.
    patterns = F.interpolate(coarse, size=(spec.size, spec.size), mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(spec.num_classes, (n,), generator=g)
    noise = torch.rand(n, spec.channels, spec.size, spec.size, generator=g)
    images = (0.6 * patterns[labels] + 0.4 * noise) * 255
    return images.to(torch.uint8), labels


def balanced_subset(
    targets: Tensor, size: int, seed: int, flag: str = "--train-size", of: str = "training set"
) -> Tensor:
    """A fixed, seeded, class-balanced choice of ``size`` indices; earlier classes take the rest.
    ``flag`` and ``of`` name the request and the set in the error when it cannot be met."""
    if size > len(targets):
        raise DataError(f"{flag} {size} is larger than the {of} ({len(targets)} samples)")
    classes = torch.unique(targets)
    g = torch.Generator().manual_seed(seed)
    per_class, extra = divmod(size, len(classes))
    chosen = []
    for i, c in enumerate(classes.tolist()):
        members = torch.nonzero(targets == c).flatten()
        take = per_class + (1 if i < extra else 0)
        if take > len(members):
            raise DataError(f"{flag} {size}: class {c} has only {len(members)} samples")
        chosen.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(chosen).sort().values


def split_training_set(targets: Tensor, config: DataConfig, seed: int
                       ) -> tuple[Tensor, Tensor | None]:
    """Training indices and, with --val-size, a held-out validation split that replaces the
    test set for scoring (so hyper-parameters are never tuned on the test set). The
    validation samples are drawn first; --train-size then samples from the rest."""
    pool = torch.arange(len(targets))
    held_out = None
    if config.val_size:
        held_out = balanced_subset(targets, config.val_size, seed + 1, "--val-size")
        mask = torch.ones(len(targets), dtype=torch.bool)
        mask[held_out] = False
        pool = pool[mask]
    if config.train_size:
        pool = pool[balanced_subset(targets[pool], config.train_size, seed)]
    return pool, held_out


def scored_subset(targets: Tensor, config: DataConfig, seed: int) -> Tensor | None:
    """With --eval-size, the seeded, class-balanced part of the test (or validation) set that
    is scored; None scores all of it."""
    if not config.eval_size:
        return None
    of = "validation split" if config.val_size else "test set"
    return balanced_subset(targets, config.eval_size, seed + 2, "--eval-size", of)


def input_spec(config: DataConfig) -> InputSpec:
    """The input spec of the configured data without loading it (an image folder's classes
    are its training subfolders)."""
    if config.dataset != "imagefolder":
        return SPECS[config.dataset]
    root = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
    try:
        classes = [p for p in (root / "train").iterdir() if p.is_dir()]
    except OSError as err:
        raise DataError(
            f"imagefolder: expected {root}/train/<class>/ (set --data-dir): {err}"
        ) from None
    return InputSpec(channels=3, size=config.image_size or 224, num_classes=len(classes))


def build_datasets(config: DataConfig, seed: int) -> tuple[IndexedImages, IndexedImages, InputSpec]:
    """Train and test sets (with sample ids) and the input spec they imply."""
    root = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
    name = config.dataset
    if name == "imagefolder":
        return _image_folders(root, config, seed)
    spec = SPECS[name]
    if name == "synthetic":
        train_x, train_y = synthetic(config.synthetic_train, spec, seed=1234)
        test_x, test_y = synthetic(config.synthetic_test, spec, seed=4321)
        stats_name = "cifar10"
    else:
        train_x, train_y = _load_torchvision(name, root, train=True)
        test_x, test_y = _load_torchvision(name, root, train=False)
        stats_name = name
    keep, held_out = split_training_set(train_y, config, seed)
    if held_out is not None:
        test_x, test_y = train_x[held_out], train_y[held_out]
    scored = scored_subset(test_y, config, seed)
    if scored is not None:
        test_x, test_y = test_x[scored], test_y[scored]
    train_x, train_y = train_x[keep], train_y[keep]
    train = IndexedImages(
        train_x, train_y, _transforms(stats_name, spec.size, True, config.augment), seed
    )
    test = IndexedImages(test_x, test_y, _transforms(stats_name, spec.size, False, False), seed)
    return train, test, spec


class _FolderImages:
    """ImageFolder files decoded lazily to uint8 (C, H, W) tensors."""

    def __init__(self, folder: datasets.ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Tensor:
        path, _ = self.folder.samples[index]
        try:
            image = self.folder.loader(path).convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a bad file
            raise DataError(f"{path}: cannot be read as an image ({first_line(err)})") from None
        return v2.functional.pil_to_tensor(image)


def _image_folders(
    root: Path, config: DataConfig, seed: int
) -> tuple[IndexedImages, IndexedImages, InputSpec]:
    """ImageFolder layout: root/train/<class>/*.jpg and root/val/<class>/*.jpg."""
    try:
        train_folder = datasets.ImageFolder(str(root / "train"))
        test_folder = datasets.ImageFolder(str(root / "val"))
    except (FileNotFoundError, OSError) as err:
        raise DataError(
            f"imagefolder: expected {root}/train/<class>/ and {root}/val/<class>/ "
            f"(set --data-dir): {err}"
        ) from None
    size = config.image_size or 224
    spec = InputSpec(channels=3, size=size, num_classes=len(train_folder.classes))
    mean, std, _ = STATS["imagefolder"]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train_tf = v2.Compose(
        [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *normalize]
        if config.augment
        else [v2.Resize(size, antialias=True), v2.CenterCrop(size), *normalize]
    )
    test_tf = v2.Compose(
        [v2.Resize(size * 8 // 7, antialias=True), v2.CenterCrop(size), *normalize]
    )
    train_y = torch.tensor(train_folder.targets)
    images: Any = _FolderImages(train_folder)
    keep, held_out = split_training_set(train_y, config, seed)
    train = IndexedImages(
        Subset(images, keep.tolist()), train_y[keep], GlobalSeeded(train_tf), seed
    )
    test_images: Any = _FolderImages(test_folder)
    test_y = torch.tensor(test_folder.targets)
    if held_out is not None:
        test_images, test_y = Subset(images, held_out.tolist()), train_y[held_out]
    scored = scored_subset(test_y, config, seed)
    if scored is not None:
        test_images, test_y = Subset(test_images, scored.tolist()), test_y[scored]
    test = IndexedImages(test_images, test_y, GlobalSeeded(test_tf), seed)
    return train, test, spec


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "trgl_dist" / "data"


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch as lists of (epoch, sample id) keys: a seeded shuffle set by
    (seed, epoch) alone for training, the dataset's order otherwise; from batch ``skip`` on
    (a resumed run), and only the batches ``keep`` takes (a stage replica's share)."""

    def __init__(self, size: int, batch_size: int, *, train: bool, seed: int) -> None:
        self.size, self.batch_size, self.train, self.seed = size, batch_size, train, seed
        self.epoch = self.skip = 0
        self.keep: Callable[[int], bool] | None = None

    def set_epoch(
        self, epoch: int, skip: int = 0, keep: Callable[[int], bool] | None = None
    ) -> None:
        """``keep(k)``: whether batch k (0-based, in the whole epoch) is drawn."""
        self.epoch, self.skip, self.keep = epoch, skip, keep

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.train:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        for k in range(self.skip, -(-self.size // self.batch_size)):
            if self.keep is None or self.keep(k):
                chunk = order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
                yield [(self.epoch, i) for i in chunk]

    def __len__(self) -> int:
        total = -(-self.size // self.batch_size)
        return sum(1 for k in range(self.skip, total) if self.keep is None or self.keep(k))


class EpochLoader:
    """Batches (x, y, ids) of a dataset, epoch after epoch, from one DataLoader: its worker
    processes (``workers`` > 0) persist across epochs, and on GPU the batches come in pinned
    memory so their copy to the device does not block the host. The last batch may be short.
    """

    def __init__(
        self,
        dataset: IndexedImages,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.batches = EpochBatches(len(dataset), batch_size, train=train, seed=seed)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
        )

    def epoch(
        self, epoch: int, skip: int = 0, keep: Callable[[int], bool] | None = None
    ) -> Iterator[Any]:
        """The batches of ``epoch``, from batch ``skip`` on, those ``keep`` takes."""
        self.batches.set_epoch(epoch, skip, keep)
        return iter(self.loader)


def make_loader(
    dataset: IndexedImages,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    epoch: int,
    workers: int = 0,
    skip_batches: int = 0,
) -> Iterator[Any]:
    """The batches (x, y, ids) of one epoch (see EpochLoader)."""
    loader = EpochLoader(dataset, batch_size, train=train, seed=seed, workers=workers)
    return loader.epoch(epoch, skip_batches)


def loader_workers(configured: int, device: torch.device) -> int:
    """Data-loader worker processes: as configured, or by default (-1) two on GPU, where
    augmentation must keep up with the device, and none on CPU, where the cores compute."""
    if configured >= 0:
        return configured
    return 2 if device.type == "cuda" else 0


def steps_per_epoch(dataset: IndexedImages, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)
