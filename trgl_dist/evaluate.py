"""`python -m trgl_dist.evaluate FILE --dataset NAME`: score an exported model on a test set."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trgl_dist.cli import command_parser
from trgl_dist.data import DATASETS, SPECS, DataConfig, IndexedImages, build_datasets, make_loader
from trgl_dist.errors import ConfigError, DataError, first_line
from trgl_dist.network.models import InputSpec

log = logging.getLogger("trgl_dist.evaluate")

META_NAME = "trgl_dist.json"  # the metadata's name among the model file's extra files

DESCRIPTION = """\
Score a model written by `python -m trgl_dist.export` on a dataset's test set. The model is
loaded with plain torch (torch.export.load, or torch.jit.load for TorchScript); the images are
normalized by the data pipeline exactly as in training (the model does not normalize)."""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("evaluate", DESCRIPTION)
    parser.add_argument("file", type=Path, metavar="FILE", help="an exported model file")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="dataset to score on")
    parser.add_argument("--data-dir", default="", help="dataset root (default: as in training)")
    parser.add_argument("--batch-size", type=int, default=256, help="test batch size")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a file written by trgl_dist.export with plain torch: (model, metadata)."""
    extra = {META_NAME: ""}
    if archive_format(path) == "torch.export":
        with open(path, "rb") as f:  # a buffer: torch.export.load wants .pt2 names otherwise
            module = torch.export.load(f, extra_files=extra).module()
    else:
        with warnings.catch_warnings():  # TorchScript's deprecation notice: we know
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), _extra_files=extra)
    raw = extra[META_NAME]
    text = raw.decode() if isinstance(raw, bytes) else raw
    return module, json.loads(text) if text else {}


def archive_format(path: Path) -> str:
    """torch.export archives hold an ``archive_format`` record, TorchScript ones a
    ``constants.pkl``; anything else is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise DataError(f"{path}: not a model archive (corrupted or truncated?)") from None
    if any(name.endswith("/archive_format") for name in names):
        return "torch.export"
    if any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    raise DataError(f"{path}: neither a torch.export nor a TorchScript archive")


def open_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model and its metadata; an unreadable file is one DataError line."""
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    try:
        return load_model(path)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupted, truncated or foreign: one line
        raise DataError(
            f"{path}: cannot be loaded as an exported model ({first_line(err)})"
        ) from None


def load_test_set(
    args: argparse.Namespace, meta: dict[str, Any]
) -> tuple[IndexedImages, InputSpec]:
    """The dataset's test set, sized as the model was trained where the dataset allows it."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be > 0, got {args.batch_size}")
    config = DataConfig(dataset=args.dataset, data_dir=args.data_dir, augment=False)
    if args.dataset == "imagefolder" and meta.get("input"):
        config = dataclasses.replace(config, image_size=int(meta["input"][-1]))
    if args.dataset == "synthetic" and meta.get("synthetic_test"):
        config = dataclasses.replace(config, synthetic_test=int(meta["synthetic_test"]))
    _, test, spec = build_datasets(config, seed=0)
    return test, spec


def check_fits(meta: dict[str, Any], spec: InputSpec, dataset: str) -> None:
    """The dataset's samples and classes must be the model's."""
    shape = [spec.channels, spec.size, spec.size]
    if meta.get("input") is not None and list(meta["input"]) != shape:
        raise DataError(
            f"the model takes {'x'.join(map(str, meta['input']))} inputs and {dataset} "
            f"has {'x'.join(map(str, shape))} images"
        )
    if meta.get("num_classes") is not None and meta["num_classes"] != spec.num_classes:
        raise DataError(
            f"the model predicts {meta['num_classes']} classes and {dataset} has {spec.num_classes}"
        )


@torch.no_grad()
def score(model: nn.Module, test: IndexedImages, batch_size: int) -> dict[str, Any]:
    """Accuracy over the whole test set, and the forward throughput."""
    correct = total = 0
    seconds = 0.0
    for x, y, _ids in make_loader(test, batch_size, train=False, seed=0, epoch=0):
        started = time.perf_counter()
        logits_BK = model(x)
        seconds += time.perf_counter() - started
        correct += int((logits_BK.argmax(1) == y).sum())
        total += len(y)
    return {
        "accuracy": correct / max(total, 1),
        "correct": correct,
        "samples": total,
        "samples_per_s": total / max(seconds, 1e-9),
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    model, meta = open_model(args.file)
    if args.dataset in SPECS:  # refuse a dataset that cannot fit before loading it
        check_fits(meta, SPECS[args.dataset], args.dataset)
    test, spec = load_test_set(args, meta)
    check_fits(meta, spec, args.dataset)
    try:
        result = score(model, test, args.batch_size)
    except RuntimeError as err:  # a foreign model without metadata that does not fit
        raise DataError(f"the model cannot run on {args.dataset}: {first_line(err)}") from None
    return {"file": str(args.file), "dataset": args.dataset, **_described(meta), **result}


def _described(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("format", "model", "module", "modules", "dataset")
    return {("trained_on" if k == "dataset" else k): meta.get(k) for k in keys}


def format_result(result: dict[str, Any]) -> str:
    return (
        f"accuracy {result['accuracy']:.4%} ({result['correct']}/{result['samples']}) on the "
        f"{result['dataset']} test set, {result['samples_per_s']:.1f} samples/s; model: module "
        f"{result['module']} of {result['modules']} of {result['model']} ({result['format']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)
        result = evaluate(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
