"""Run configuration: frozen dataclasses per component, defaults < TOML file < flags.

Every field carries its help text (one sentence, with its unit): the command line shows it,
so a flag's description cannot drift from the field it sets. Choice lists come from the
components that own them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from trgl_dist.atomic import atomic_write
from trgl_dist.data import DataConfig
from trgl_dist.errors import ConfigError
from trgl_dist.network.heads import HEAD_NAMES
from trgl_dist.network.models import MODEL_NAMES
from trgl_dist.network.split import SPLIT_KINDS
from trgl_dist.sections import setting

REGIMES = ("e2e", "parallel", "sequential", "multilap", "pipeline")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("auto", "constant", "step", "cosine")
#: How a pipeline lays out its ranks (pipeline.plan; trgl_dist/planning/plan.py).
PLANS = ("time", "auto", "even")

# The config schema version: a resumed run whose config.toml has another one is refused.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("resnet-small", f"Architecture: {', '.join(MODEL_NAMES)}.")
    modules: int = setting(4, "Number of modules K the network is cut into.")
    split: str = setting(
        "equal-depth", f"How blocks are divided into modules: {', '.join(SPLIT_KINDS)}."
    )
    split_counts: tuple[int, ...] = setting(
        (), "Explicit blocks per module, e.g. 14,14,13,13 (overrides --split)."
    )
    head: str = setting("1cnn", f"Auxiliary classifier of every module: {', '.join(HEAD_NAMES)}.")
    width: int = setting(0, "Channels of the first stage (0: the model's default).")
    blocks_per_module: int = setting(2, "Blocks per module of km-resnet (M of K-M ResNet).")


@dataclass(frozen=True)
class MethodConfig:
    name: str = setting("trgl", "Local objective: vanilla (VanGL), trgl, or multipliers.")
    tau: float = setting(1.0, "TRGL's tau: the transport term is weighted 1/(2 tau); finite, > 0.")
    tau_schedule: str = setting(
        "midpoint-double",
        "Per-module tau: midpoint-double (tau/2, then tau from the midpoint), constant, "
        "or list (--tau-values).",
    )
    tau_values: tuple[float, ...] = setting(
        (), "Explicit tau per module, with --tau-schedule list."
    )
    transport_norm: str = setting(
        "mean", "W per block: mean of r**2 (authors' code) or sum (per-sample squared norm)."
    )
    label_smoothing: float = setting(0.1, "Label smoothing of the cross-entropy, in [0, 1).")
    multiplier_h: float = setting(0.1, "Multipliers: lambda grows by h * CE at each update.")
    multiplier_every: int = setting(50, "Multipliers: update lambda every this many steps.")
    multiplier_init: float = setting(1.0, "Multipliers: initial lambda of every module.")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting("sgd", f"Optimizer: {', '.join(OPTIMIZERS)}.")
    lr: float = setting(
        0.0, "Learning rate (0: the paper's default for the regime; 0.05 for resnet-small)."
    )
    momentum: float = setting(0.9, "SGD momentum, in [0, 1).")
    weight_decay: float = setting(2e-4, "Weight decay (L2 penalty), >= 0.")
    schedule: str = setting(
        "auto",
        "Learning-rate schedule per epoch: auto (e2e: /5 at epochs 120/160/200; AdamW: "
        "cosine; else constant), constant, step, cosine.",
    )


@dataclass(frozen=True)
class TrainConfig:
    regime: str = setting(
        "parallel",
        "e2e, parallel, sequential, multilap (one process) or pipeline (under torchrun).",
    )
    epochs: int = setting(
        0, "Epochs (0: one, or as many as --max-steps takes); per module for sequential."
    )
    max_steps: int = setting(0, "Stop after this many optimizer steps per module (0: no limit).")
    seed: int = setting(0, "Seed of the weights, the data order and the augmentation.")
    module_epochs_base: int = setting(
        0, "Sequential/multilap: module k trains base + slope * k epochs (0: --epochs)."
    )
    module_epochs_slope: int = setting(0, "Sequential/multilap: extra epochs per module index.")
    laps: int = setting(2, "Multilap: laps over the modules, sharing the same epoch budget.")
    accumulate: tuple[int, ...] = setting(
        (),
        "Parallel and e2e: batches whose gradients make one optimizer step, one count for "
        "every module or one per module (empty: 1).",
    )
    cache_frozen: bool = setting(
        False, "Sequential: keep the frozen modules' outputs in memory instead of recomputing."
    )
    eval_every: int = setting(
        1, "Score the modules every this many epochs (0: only after the last epoch)."
    )
    log_every: int = setting(20, "Steps between two train records of a module.")
    checkpoint_every: int = setting(
        0, "Also checkpoint every this many steps (0: only at each epoch's end)."
    )
    keep_checkpoints: int = setting(3, "Keep the newest this many complete checkpoints (0: all).")
    out: str = setting("", "Folder the run writes into; empty: runs/<regime>-<time>.")


@dataclass(frozen=True)
class PipelineConfig:
    buffer_size: int = setting(2, "Capacity of each stage's inbox and outbox, in batches.")
    buffer_policy: str = setting(
        "fifo", "fifo (each batch once, exact, backpressure) or replay (DGL's reuse buffer)."
    )
    max_reuse: int = setting(4, "Replay: the most times one batch is trained on by a stage.")
    stage_replicas: tuple[int, ...] = setting(
        (),
        "Replicas per stage, e.g. 2,1 (one count: the same for every stage; empty: 1). The "
        "ranks are their sum; the replicas of a stage average their gradients every step.",
    )
    stage_modules: tuple[int, ...] = setting(
        (), "Modules per stage, e.g. 6,5,5 (empty: as --plan chooses)."
    )
    trace: bool = setting(
        False,
        "Write RUN_DIR/trace.json, a timeline of every rank (Chrome trace format, loads in "
        "ui.perfetto.dev), and draw a window of it in the report.",
    )
    plan: str = setting(
        "time",
        "How the ranks are laid out: time (the stages' modules balance the measured time), "
        "auto (the planner also chooses the stages and their replicas for the ranks), even "
        "(equal module counts).",
    )
    coordinator: str = setting(
        "",
        "Address the metrics coordinator binds, tcp://HOST:PORT (port 0: a free one; empty: "
        "loopback on one node, torchrun's MASTER_ADDR when the ranks span nodes).",
    )
    link_timeout: float = setting(
        60.0,
        "Seconds a rank may go unheard (no record, no heartbeat) before the run stops as "
        "frozen; also bounds a payload transfer once its header has arrived.",
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def replace(self, section: str, **values: Any) -> Config:
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **values)}
        )


SECTION_TYPES = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "pipeline": PipelineConfig,
}
# Flags whose name differs from "--" + field name.
FLAG_ALIASES = {("model", "name"): "model", ("method", "name"): "method"}


def flag_name(section: str, key: str) -> str:
    return FLAG_ALIASES.get((section, key), key).replace("_", "-")


def _check_toml_type(key: str, value: Any, default: Any) -> None:
    """A TOML file states types: a boolean must be true or false, a number a number."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
        raise ConfigError(f"{key}: {value!r} is not {want}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a TOML or flag value to its field's type, naming the key on failure."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = float if key.endswith("tau_values") else int
            return tuple(kind(v) for v in items if str(v).strip() != "")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {type(default).__name__}") from None


def from_mapping(
    data: dict[str, Any], base: Config | None = None, *, typed: bool = False
) -> Config:
    """Apply a nested mapping {section: {key: value}} over ``base``: flags (strings), or a
    TOML file (``typed``: each value must already have its field's type)."""
    config = base or Config()
    for section, values in data.items():
        if section == "schema_version":
            continue
        if section not in SECTION_TYPES or not isinstance(values, dict):
            raise ConfigError(
                f"unknown config section {section!r} (known: {', '.join(SECTION_TYPES)})"
            )
        current = getattr(config, section)
        known = {f.name for f in dataclasses.fields(current)}
        updates = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key}")
            if typed:
                _check_toml_type(f"{section}.{key}", value, getattr(current, key))
            updates[key] = _coerce(f"{section}.{key}", value, getattr(current, key))
        config = config.replace(section, **updates)
    return config


def load_toml(path: Path, base: Config | None = None) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a UTF-8 text file (binary?)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{path}: schema_version must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path} was written with config schema {version}; this version reads {SCHEMA_VERSION}"
        )
    return from_mapping(data, base, typed=True)


def to_mapping(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for section in SECTION_TYPES:
        out[section] = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(getattr(config, section)).items()
        }
    return out


def write_toml(config: Config, path: Path) -> None:
    text = tomli_w.dumps(to_mapping(config)).encode("utf-8")
    atomic_write(path, lambda out: out.write(text))


def planned_epochs(train: TrainConfig, steps_per_epoch: int) -> int:
    """--epochs, or when it is not given: one, or as many as --max-steps takes."""
    if train.epochs:
        return train.epochs
    if train.max_steps:
        return -(-train.max_steps // steps_per_epoch)
    return 1


def scores_after(train: TrainConfig, epoch: int, last_epoch: int) -> bool:
    """Whether the test pass follows ``epoch`` (0-based): every --eval-every epochs, and
    always after the last one."""
    every = train.eval_every
    return epoch >= last_epoch or (every > 0 and (epoch + 1) % every == 0)


def module_epochs(train: TrainConfig, num_modules: int, steps_per_epoch: int = 1) -> list[int]:
    """Per-module epoch budget of sequential/multilap: N_k = a + b*k, k = 1..K."""
    base = train.module_epochs_base or planned_epochs(train, steps_per_epoch)
    return [base + train.module_epochs_slope * k for k in range(1, num_modules + 1)]


# The CPU demo model trains for an epoch or two, not the paper's hundreds: the paper's
# module-wise rates (0.002-0.007) barely move it in that time, so it has its own default.
DEMO_MODEL_LR = 0.05


def default_lr(config: Config) -> float:
    """The paper's learning rates: e2e 0.1, parallel/pipeline 0.003 (0.002 at batch < 256),
    sequential and multilap 0.007; AdamW (Swin) 5e-4. resnet-small: 0.05 (0.1 for e2e)."""
    if config.optim.lr > 0:
        return config.optim.lr
    if config.optim.optimizer == "adamw":
        return 5e-4
    regime = config.train.regime
    if regime == "e2e":
        return 0.1
    if config.model.name == "resnet-small":
        return DEMO_MODEL_LR
    if regime in ("sequential", "multilap"):
        return 0.007
    return 0.003 if config.data.batch_size >= 256 else 0.002
