"""What the study trains: validation sweeps, the choices they make, then the final runs."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from experiments import Mult, Preset, RunSpec

SWEEP_PHASES = ("lr", "tau", "mult")
FINAL_PHASES = ("main", "deep")
CRITERION = "last_module_accuracy"


@dataclass
class Choice:
    """Hyper-parameters picked on the validation split; None until their sweep has finished."""

    lr: float | None = None
    e2e_lr: float | None = None
    tau: dict[int, float] = field(default_factory=dict)
    mult: dict[int, Mult] = field(default_factory=dict)
    chosen_ids: list[str] = field(default_factory=list)

    def complete(self, preset: Preset) -> bool:
        return (
            self.lr is not None
            and self.e2e_lr is not None
            and set(self.tau) == set(preset.sizes)
            and set(self.mult) == set(preset.mult_sizes)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "e2e_lr": self.e2e_lr,
            "tau": {str(k): v for k, v in self.tau.items()},
            "mult": {str(k): list(v) for k, v in self.mult.items()},
            "criterion": f"validation {CRITERION}, mean over the sweep seeds",
            "chosen_ids": self.chosen_ids,
        }


def _sweep(
    phase: str, method: str, size: int, grid: Iterable[Any], preset: Preset, make: Callable
) -> list[RunSpec]:
    """One RunSpec per grid value and sweep seed (``make(value)`` gives lr, tau, mult)."""
    return [
        RunSpec(phase, method, size, seed, preset.epochs_for(size), validation=True, **make(v))
        for v in grid
        for seed in preset.sweep_seeds
    ]


def lr_sweeps(preset: Preset) -> tuple[list[RunSpec], list[RunSpec]]:
    """VanGL over the module-wise lr grid, E2E over its own, at ``preset.lr_size``."""
    size = preset.lr_size
    vanilla = _sweep("lr", "vanilla", size, preset.lr_grid, preset, lambda v: {"lr": v})
    e2e = _sweep("lr", "e2e", size, preset.e2e_lr_grid, preset, lambda v: {"lr": v})
    return vanilla, e2e


def tau_sweep(preset: Preset, size: int, lr: float) -> list[RunSpec]:
    return _sweep("tau", "trgl", size, preset.tau_grid, preset, lambda v: {"lr": lr, "tau": v})


def mult_sweep(preset: Preset, size: int, lr: float) -> list[RunSpec]:
    return _sweep(
        "mult", "multipliers", size, preset.mult_grid, preset, lambda v: {"lr": lr, "mult": v}
    )


def pick(
    specs: list[RunSpec], results: Mapping[str, dict[str, Any]], key: Callable[[RunSpec], Hashable]
) -> tuple[Any, list[str]] | None:
    """The grid value (``key``) with the best mean validation score, once the sweep is recorded."""
    # The first value wins a tie; a value with a failed (diverged) run is out; if every
    # value is out, the first one of the grid is used.
    if not specs or any(s.run_id not in results for s in specs):
        return None
    groups: dict[Hashable, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(key(spec), []).append(spec)
    best, best_score = None, float("-inf")
    for value, members in groups.items():
        records = [results[s.run_id] for s in members]
        if any(r["status"] != "ok" for r in records):
            continue
        score = sum(r[CRITERION] for r in records) / len(records)
        if score > best_score:
            best, best_score = value, score
    value = best if best is not None else next(iter(groups))
    return value, [s.run_id for s in groups[value]]


def choose(preset: Preset, results: Mapping[str, dict[str, Any]]) -> Choice:
    """Every choice whose sweep has finished."""
    choice = Choice()
    vanilla, e2e = lr_sweeps(preset)
    for specs, name in ((vanilla, "lr"), (e2e, "e2e_lr")):
        picked = pick(specs, results, lambda s: s.lr)
        if picked:
            setattr(choice, name, picked[0])
            choice.chosen_ids += picked[1]
    if choice.lr is None:
        return choice
    for size in preset.sizes:
        picked = pick(tau_sweep(preset, size, choice.lr), results, lambda s: s.tau)
        if picked:
            choice.tau[size] = picked[0]
            choice.chosen_ids += picked[1]
    for size in preset.mult_sizes:
        picked = pick(mult_sweep(preset, size, choice.lr), results, lambda s: s.mult)
        if picked:
            choice.mult[size] = picked[0]
            choice.chosen_ids += picked[1]
    return choice


def sweeps(preset: Preset, choice: Choice) -> list[RunSpec]:
    """The validation runs that can be planned now (tau and mult need the lr)."""
    vanilla, e2e = lr_sweeps(preset)
    specs = vanilla + e2e
    if choice.lr is not None:
        for size in preset.sizes:
            specs += tau_sweep(preset, size, choice.lr)
        for size in preset.mult_sizes:
            specs += mult_sweep(preset, size, choice.lr)
    return specs


def finals(preset: Preset, choice: Choice) -> list[RunSpec]:
    """The test-set runs whose hyper-parameters are known, seeds outermost."""
    # Seeds outermost: an interrupted study has about as many seeds in every cell.
    specs = []
    for seed in preset.seeds:
        for size in preset.sizes:
            epochs, tau = preset.epochs_for(size), choice.tau.get(size)
            if choice.lr is not None:
                specs.append(RunSpec("main", "vanilla", size, seed, epochs, choice.lr))
            if tau is not None and choice.lr is not None:
                specs.append(RunSpec("main", "trgl", size, seed, epochs, choice.lr, tau))
            if choice.e2e_lr is not None:
                specs.append(RunSpec("main", "e2e", size, seed, epochs, choice.e2e_lr))
            mult = choice.mult.get(size)
            if mult is not None and choice.lr is not None:
                specs.append(
                    RunSpec("main", "multipliers", size, seed, epochs, choice.lr, mult=mult)
                )
            if size == preset.deep_size and choice.lr is not None:
                k = preset.deep_modules
                specs.append(RunSpec("deep", "vanilla", size, seed, epochs, choice.lr, modules=k))
                if tau is not None:
                    specs.append(
                        RunSpec("deep", "trgl", size, seed, epochs, choice.lr, tau, modules=k)
                    )
    return specs


def planned(preset: Preset, choice: Choice) -> list[RunSpec]:
    """Everything that can be planned now, sweeps first (they unlock the rest)."""
    return sweeps(preset, choice) + finals(preset, choice)
