"""The memory experiments: E2E, the lock-step regime and each pipeline stage, per K/split/method."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from benchenv import NetworkSetting
from tracker import (
    MIB,
    Network,
    build_fake,
    fake_batches,
    input_shape,
    output_shape,
    peak_of,
    stage_eval_step,
    stage_step,
    training_step,
)

from trgl_dist.config import PipelineConfig
from trgl_dist.method import literal_local_loss, local_loss
from trgl_dist.training.build import backbone_for, split_for
from trgl_dist.training.learner import LossFn

log = logging.getLogger("memory.experiments")
#: The test pass sends batches twice the training batch
#: (``trgl_dist.training.schedule.test_loader``: 2 * batch_size).
EVAL_BATCH_FACTOR = 2
#: Method names of this benchmark: trgl_dist's, plus TRGL with the literal local loss that
#: puts W in the autograd graph (``trgl_dist.method.literal_local_loss``), as a baseline.
TRGL_GRAPH = "trgl-graph"


def method_parts(method: str) -> tuple[str, LossFn]:
    """(trgl_dist method name, local loss function) of a benchmark method name."""
    if method == TRGL_GRAPH:
        return "trgl", literal_local_loss
    return method, local_loss


@dataclass(frozen=True)
class Setting(NetworkSetting):
    """The network, batch and buffer bound every configuration of one run shares."""

    size: int = 96
    buffer_size: int = PipelineConfig.buffer_size


def block_counts(setting: Setting, modules: int, split: str) -> list[int]:
    """trgl_dist's own split of the real backbone (equal-memory probes a small real forward)."""
    config = setting.config(modules, "vanilla").replace("model", split=split)
    return split_for(config, backbone_for(config.model, setting.spec), setting.spec)


def measure_e2e(setting: Setting, modules: int) -> dict[str, float]:
    """Back-propagation through the same K modules' bodies and last head, one optimizer."""
    counts = block_counts(setting, modules, "equal-depth")
    config = setting.config(modules, "vanilla").replace("train", regime="e2e")
    return measure_training(build_fake(config, setting.spec, counts), setting)


def measure_training(net: Network, setting: Setting) -> dict[str, float]:
    """One training batch of the network's regime (E2E or lock-step), every module,
    optimizer and the batch on one device."""
    tracked = [*net.modules, *net.optimizers]
    return peak_of(net, training_step(net, setting.batch_size), tracked)


def stage_buffers(net: Network, stage: int, batch: int, capacity: int) -> list[torch.Tensor]:
    """The batches a stage's link side holds at most besides the one it computes on.

    Inbox side: ``capacity`` queued batches plus the one the receiver thread has received
    and is blocked putting into the full inbox. Outbox side: ``capacity`` queued outputs
    plus the one the sender thread is sending (Gloo ``send`` returns only when the next
    stage posts its ``recv``). The first stage has no inbox (its loader makes one batch at
    a time, the batch it computes on); the last has no outbox.
    """
    held: list[torch.Tensor] = []
    if stage > 0:
        held += fake_batches(net, input_shape(net, stage), batch, capacity + 1)
    if stage < len(net.learners) - 1:
        held += fake_batches(net, output_shape(net, stage), batch, capacity + 1)
    return held


def batch_mib(shape: tuple[int, ...], batch: int) -> float:
    """MiB of one wire batch: activations plus int64 labels and sample ids."""
    numel = 1
    for side in shape:
        numel *= side
    return (batch * numel * 4 + 2 * batch * 8) / MIB


def measure_stage(net: Network, setting: Setting, stage: int) -> dict[str, Any]:
    """Stage ``stage`` (one module per stage, W = K) in three phases.

    train: a training step with every buffer full of training batches (steady state).
    epoch_end: the last training step of an epoch, the inbox already full of test batches
    (twice as large): the train peak plus that difference, since buffers are constant.
    test: a test-pass step (no grad) with every buffer full of test batches.
    """
    learner = net.learners[stage]
    tracked = [learner.module, learner.optimizer]
    cap, batch = setting.buffer_size, setting.batch_size
    held = stage_buffers(net, stage, batch, cap)
    train = peak_of(net, stage_step(net, stage, batch, held), [*tracked, *held])
    held_eval = stage_buffers(net, stage, EVAL_BATCH_FACTOR * batch, cap)
    test_step = stage_eval_step(net, stage, EVAL_BATCH_FACTOR * batch, held_eval)
    test = peak_of(net, test_step, [*tracked, *held_eval])
    extra = 0.0
    if stage > 0:
        shape = input_shape(net, stage)
        larger = batch_mib(shape, EVAL_BATCH_FACTOR * batch) - batch_mib(shape, batch)
        extra = (cap + 1) * larger
    epoch_end = {
        **train,
        "batch_buffers": train["batch_buffers"] + extra,
        "total": train["total"] + extra,
    }
    worst = max((train, epoch_end, test), key=lambda p: p["total"])
    return {"stage": stage, "train": train, "epoch_end": epoch_end, "test": test, "worst": worst}


def measure_config(
    setting: Setting, modules: int, split: str, method: str, stages: bool = True
) -> dict[str, Any]:
    """Lock-step peak and (optionally) every stage's peak for one K, split and method."""
    counts = block_counts(setting, modules, split)
    name, loss = method_parts(method)
    net = build_fake(setting.config(modules, name), setting.spec, counts, loss)
    log.info("K=%d %s %s: counts %s", modules, split, method, counts)
    result: dict[str, Any] = {
        "modules": modules,
        "split": split,
        "method": method,
        "counts": counts,
        "lockstep": measure_training(net, setting),
    }
    if stages:
        result["stages"] = [measure_stage(net, setting, k) for k in range(modules)]
    return result
