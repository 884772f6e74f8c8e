"""Every impossible setting refused with one message that names its key (no torch use here).

Model-dependent checks (K larger than the number of blocks, ...) happen when the model is
built; these are the ones a config can fail on its own.
"""

from __future__ import annotations

import math
import re

from trgl_dist.config import OPTIMIZERS, PLANS, REGIMES, SCHEDULES, Config
from trgl_dist.errors import ConfigError
from trgl_dist.method import METHODS, TAU_SCHEDULES, TRANSPORT_NORMS
from trgl_dist.network.heads import HEAD_NAMES
from trgl_dist.network.split import SPLIT_KINDS
from trgl_dist.runtime.buffer import POLICIES

#: Seeds torch accepts, and a bound for every other integer (int64).
MAX_INT64 = 2**63 - 1
_ENDPOINT = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.*-]+):(\d+)$")


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def count(key: str, value: int, minimum: int = 0) -> None:
    """An integer in [minimum, 2**63 - 1]."""
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    if value > MAX_INT64:
        raise ConfigError(f"{key} must be at most 2**63 - 1, got {value}")


def number(
    key: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number in the interval; NaN and inf are refused."""
    if (
        not math.isfinite(value)
        or value < low
        or value > high
        or (low_open and value == low)
        or (high_open and value == high)
    ):
        where = _interval(low, high, low_open, high_open)
        raise ConfigError(f"{key} must be a finite number{where}, got {value}")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return "" if math.isinf(low) else f" {'>' if low_open else '>='} {low:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def endpoint(key: str, value: str) -> None:
    """Empty (automatic) or tcp://HOST:PORT with a port in 0..65535."""
    if not value:
        return
    match = _ENDPOINT.match(value)
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(f"{key}: {value!r} is not tcp://HOST:PORT with PORT in 0..65535")


def validate(config: Config) -> Config:
    """``config`` unchanged if every value is possible; else ConfigError naming the key."""
    _model(config)
    _method(config)
    config.data.validate()
    _optim(config)
    _train(config)
    _pipeline(config)
    return config


def _model(config: Config) -> None:
    m = config.model
    choice("model.split", m.split, SPLIT_KINDS)
    choice("model.head", m.head, HEAD_NAMES)
    count("model.modules", m.modules, 1)
    count("model.width", m.width)
    count("model.blocks_per_module", m.blocks_per_module, 1)
    for c in m.split_counts:
        count("model.split_counts", c, 1)
    if m.split_counts and len(m.split_counts) != m.modules:
        raise ConfigError(
            f"model.split_counts has {len(m.split_counts)} entries for {m.modules} modules"
        )


def _method(config: Config) -> None:
    me = config.method
    choice("method.name", me.name, METHODS)
    choice("method.tau_schedule", me.tau_schedule, TAU_SCHEDULES)
    choice("method.transport_norm", me.transport_norm, TRANSPORT_NORMS)
    # An infinite tau would turn TRGL into VanGL without a word: that is --method vanilla.
    number("method.tau", me.tau, 0, low_open=True)
    for tau in me.tau_values:
        number("method.tau_values", tau, 0, low_open=True)
    if me.tau_schedule == "list" and len(me.tau_values) != config.model.modules:
        raise ConfigError(
            f"method.tau_values has {len(me.tau_values)} values for {config.model.modules} modules"
        )
    number("method.label_smoothing", me.label_smoothing, 0, 1, high_open=True)
    number("method.multiplier_h", me.multiplier_h, -math.inf)
    number("method.multiplier_init", me.multiplier_init, -math.inf)
    count("method.multiplier_every", me.multiplier_every, 1)


def _optim(config: Config) -> None:
    o = config.optim
    choice("optim.optimizer", o.optimizer, OPTIMIZERS)
    choice("optim.schedule", o.schedule, SCHEDULES)
    number("optim.lr", o.lr, 0)
    number("optim.momentum", o.momentum, 0, 1, high_open=True)
    number("optim.weight_decay", o.weight_decay, 0)


def _train(config: Config) -> None:
    t = config.train
    choice("train.regime", t.regime, REGIMES)
    for key in (
        "epochs",
        "max_steps",
        "seed",
        "module_epochs_base",
        "module_epochs_slope",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        count(f"train.{key}", getattr(t, key))
    count("train.laps", t.laps, 1)
    count("train.log_every", t.log_every, 1)
    for n in t.accumulate:
        count("train.accumulate", n, 1)
    if len(t.accumulate) not in (0, 1, config.model.modules):
        raise ConfigError(
            f"train.accumulate has {len(t.accumulate)} counts for {config.model.modules} modules"
        )
    if any(n > 1 for n in t.accumulate):
        if t.regime not in ("parallel", "e2e"):
            raise ConfigError(f"train.accumulate: the {t.regime} regime steps every batch")
        if config.method.name == "multipliers":
            raise ConfigError("train.accumulate: the multipliers update lambda every batch")


def _pipeline(config: Config) -> None:
    p = config.pipeline
    count("pipeline.buffer_size", p.buffer_size, 1)
    choice("pipeline.buffer_policy", p.buffer_policy, POLICIES)
    choice("pipeline.plan", p.plan, PLANS)
    if p.plan == "auto" and (p.stage_modules or p.stage_replicas):
        raise ConfigError(
            "pipeline.plan auto chooses the stages' modules and replicas: leave "
            "--stage-modules and --stage-replicas out"
        )
    count("pipeline.max_reuse", p.max_reuse, 1)
    endpoint("pipeline.coordinator", p.coordinator)
    for n in (*p.stage_replicas, *p.stage_modules):
        count("pipeline.stage_replicas / stage_modules", n, 1)
    if p.stage_modules and sum(p.stage_modules) != config.model.modules:
        raise ConfigError(
            f"pipeline.stage_modules {list(p.stage_modules)} sums to {sum(p.stage_modules)}, "
            f"not the {config.model.modules} modules"
        )
    if any(r > 1 for r in p.stage_replicas):
        if p.buffer_policy == "replay":
            raise ConfigError(
                "pipeline.buffer_policy replay: a stage's replicas step together, every one on "
                "its own batch; replay needs one replica per stage"
            )
        if config.method.name == "multipliers":
            raise ConfigError("pipeline.stage_replicas: the multipliers update lambda every batch")
    number("pipeline.link_timeout", p.link_timeout, 1)
