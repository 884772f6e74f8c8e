"""`python -m trgl_dist.export RUN_DIR`: the cut network G_k then F_k as a standalone model file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trgl_dist.checkpoints import files as ckpt
from trgl_dist.checkpoints import manifest as layout
from trgl_dist.cli import command_parser
from trgl_dist.config import Config, load_toml
from trgl_dist.data import STATS
from trgl_dist.errors import CheckpointError, ConfigError, first_line
from trgl_dist.evaluate import META_NAME, load_model
from trgl_dist.network.models import InputSpec
from trgl_dist.network.modules import CutModel, LocalModule
from trgl_dist.rundir import CONFIG_FILE, SUMMARY_FILE
from trgl_dist.training.build import modules_for

log = logging.getLogger("trgl_dist.export")

FORMATS = ("auto", "export", "torchscript")
META_VERSION = 1
LOADERS = {
    "torch.export": "torch.export.load(FILE).module()",
    "torchscript": "torch.jit.load(FILE)",
}
EXAMPLE_BATCH = 2  # the traced example; the batch dimension stays dynamic (>= 1)

DESCRIPTION = """\
Write module k of a trained run as a standalone inference model: the bodies of modules 1..k
(G_k) then module k's classifier head (F_k), in eval mode. Plain torch loads it, without
trgl_dist: `torch.export.load(FILE).module()` (format torch.export, the default), or
`torch.jit.load(FILE)` (TorchScript, written when torch.export cannot handle the model).
The model takes a float batch (B, C, H, W) and returns logits (B, classes). Input
normalization is part of the data pipeline, not of the model: normalize as in training
(the mean and std are in the metadata, stored in the file as the extra file
trgl_dist.json and beside it as FILE.json)."""


class ExportError(RuntimeError):
    """torch could not export the model, or the written file does not compute what it should."""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", DESCRIPTION)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    parser.add_argument(
        "--module",
        default="best",
        help="best (the summary's best module; last when there is no summary), last, "
        "or a module number 1..K (default: best)",
    )
    parser.add_argument("--output", type=Path, required=True, help="model file to write (.pt2)")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="auto: torch.export, TorchScript if export fails (default: auto)",
    )
    return parser


def find_checkpoint(run_dir: Path, step: int | None) -> tuple[int, dict[str, Any]]:
    """(step, manifest) of the requested or newest complete checkpoint."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if step is None:
        found = layout.latest(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir}: no complete checkpoint")
        return found
    if step not in layout.complete_steps(run_dir):
        raise CheckpointError(f"{run_dir}: no complete checkpoint at step {step}")
    return step, layout.read_manifest(run_dir, step)


def check_manifest(manifest: dict[str, Any], config: Config) -> None:
    """The manifest must describe the run's own model (a copied-in checkpoint is refused)."""
    expected = {"model": config.model.name, "modules": config.model.modules}
    layout.check_compatible(manifest, expected)
    for key in ("blocks_per_module", "input", "num_classes"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint manifest has no {key!r}")
    if len(manifest["blocks_per_module"]) != config.model.modules:
        raise CheckpointError(
            f"checkpoint has {len(manifest['blocks_per_module'])} block counts "
            f"for {config.model.modules} modules"
        )


def choose_module(choice: str, run_dir: Path, num_modules: int) -> int:
    """The 1-based module number that ``--module`` names."""
    if choice == "last":
        return num_modules
    if choice == "best":
        best = _summary_best(run_dir)
        if best is None:
            log.info("no best module in %s: exporting the last one", run_dir / SUMMARY_FILE)
            return num_modules
        return best + 1
    try:
        number = int(choice)
    except ValueError:
        raise ConfigError(f"--module: {choice!r} is not best, last or a module number") from None
    if not 1 <= number <= num_modules:
        raise ConfigError(
            f"--module {number} is out of range: the run has modules 1..{num_modules}"
        )
    return number


def _summary_best(run_dir: Path) -> int | None:
    try:
        best = json.loads((run_dir / SUMMARY_FILE).read_text()).get("best_module")
    except (OSError, ValueError, AttributeError):
        return None
    return best if isinstance(best, int) else None


def build_cut(
    run_dir: Path, step: int, manifest: dict[str, Any], config: Config, k: int
) -> tuple[CutModel, InputSpec]:
    """Modules 1..k with the checkpoint's weights, as G_k then F_k in eval mode."""
    channels, size, _ = manifest["input"]
    spec = InputSpec(int(channels), int(size), int(manifest["num_classes"]))
    counts = [int(c) for c in manifest["blocks_per_module"]]
    try:
        modules = modules_for(config.model, spec, counts)
    except ConfigError as err:
        raise CheckpointError(f"cannot rebuild the run's model: {err}") from None
    load_weights(run_dir, step, modules[:k])
    return CutModel(modules[:k]).eval(), spec


def load_weights(run_dir: Path, step: int, modules: Sequence[LocalModule]) -> None:
    """Fill ``modules`` (modules 1..k) from their files of checkpoint ``step``."""
    for index, module in enumerate(modules):
        _load_module(module, ckpt.load_module(run_dir, step, index)["learner"], step, index)


def _load_module(module: nn.Module, learner_state: Any, step: int, index: int) -> None:
    try:
        module.load_state_dict(learner_state["module"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint step {step}, module {index + 1}: does not fit the run's model "
            f"({first_line(err)})"
        ) from None


def to_program(model: nn.Module, example: torch.Tensor, fmt: str) -> tuple[Any, str]:
    """(exported object, format name): torch.export with a dynamic batch, or TorchScript."""
    if fmt != "torchscript":
        try:
            batch = torch.export.Dim("batch", min=1)
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), "export"
        except Exception as err:  # noqa: BLE001 - any export failure: fall back, say why
            reason = first_line(err)
            if fmt == "export":
                raise ExportError(
                    f"torch.export failed: {reason} (try --format torchscript)"
                ) from None
            log.warning("torch.export failed (%s): writing TorchScript instead", reason)
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript's deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model, example), "torchscript"


def save_model(program: Any, fmt: str, path: Path, meta: dict[str, Any]) -> None:
    """The model file with its metadata inside, and the same metadata in FILE.json; written
    to a temporary name then renamed, so FILE is never half-written."""
    text = json.dumps(meta, indent=1)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        if fmt == "export":
            torch.export.save(program, tmp, extra_files={META_NAME: text})
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(program, str(tmp), _extra_files={META_NAME: text})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    Path(f"{path}.json").write_text(text + "\n")


def metadata(
    manifest: dict[str, Any], config: Config, step: int, k: int, fmt: str, run_dir: Path
) -> dict[str, Any]:
    dataset = str(manifest.get("dataset", config.data.dataset))
    mean, std, _ = STATS.get("cifar10" if dataset == "synthetic" else dataset, ((), (), False))
    return {
        "trgl_dist_export": META_VERSION,
        "format": "torch.export" if fmt == "export" else "torchscript",
        "model": manifest["model"],
        "module": k,
        "modules": manifest["modules"],
        "blocks": manifest["blocks_per_module"][:k],
        "input": manifest["input"],
        "num_classes": manifest["num_classes"],
        "dataset": dataset,
        "normalize": {"mean": list(mean), "std": list(std), "done_by": "data pipeline"},
        "synthetic_test": config.data.synthetic_test,
        "run_dir": str(run_dir),
        "step": step,
    }


def check_output(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {path}: directory {parent} does not exist or is not writable")


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Do the whole export; returns the metadata written."""
    check_output(args.output)
    step, manifest = find_checkpoint(args.run_dir, args.step)
    config = load_toml(args.run_dir / CONFIG_FILE)
    check_manifest(manifest, config)
    k = choose_module(args.module, args.run_dir, int(manifest["modules"]))
    model, spec = build_cut(args.run_dir, step, manifest, config, k)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, spec.channels, spec.size, spec.size, generator=generator)
    program, fmt = to_program(model, example, args.format)
    meta = metadata(manifest, config, step, k, fmt, args.run_dir)
    try:
        save_model(program, fmt, args.output, meta)
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"--output {args.output}: cannot write ({err})") from None
    verify(args.output, model, example)
    return meta


@torch.no_grad()
def verify(path: Path, model: nn.Module, example: torch.Tensor) -> None:
    """Load the written file back and check it computes what the model computes."""
    loaded, _ = load_model(path)
    gap = (loaded(example) - model(example)).abs().max().item()
    if gap > 1e-4:
        raise ExportError(f"the written model's output differs from the run's by {gap:.3g}")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)
        meta = export(args)
    except (ConfigError, CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, ExportError) else 2
    loader = LOADERS[meta["format"]]
    print(
        f"wrote {args.output} ({meta['format']}): module {meta['module']} of {meta['modules']} "
        f"of {meta['model']}, input {'x'.join(map(str, meta['input']))}, "
        f"{meta['num_classes']} classes, checkpoint step {meta['step']}; load with {loader}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
