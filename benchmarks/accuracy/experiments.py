"""The named experiments of the accuracy study: presets (smoke, quick, full) and run specs."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Methods of the study: module-wise VanGL and TRGL (trained in a module-wise regime) and E2E.
MODULEWISE = ("vanilla", "trgl")
METHOD_LABELS = {"vanilla": "VanGL", "trgl": "TRGL", "e2e": "E2E"}


def size_label(size: int) -> str:
    """A train size as the tables show it (0 is the whole training set)."""
    return "60000 (full)" if size == 0 else str(size)


@dataclass(frozen=True)
class Preset:
    """Everything that sizes one mode of the study; the grids are searched on validation only."""

    name: str
    dataset: str
    model_flags: tuple[str, ...]  # the network, without its split into modules
    blocks: int  # residual blocks of the network
    modules: int  # K of the main runs (blocks / K blocks per module)
    batch_size: int
    sizes: tuple[int, ...]
    epochs: tuple[int, ...]  # per entry of ``sizes``: fewer samples, more epochs
    seeds: tuple[int, ...]
    val_size: int  # held out of the training set for the sweeps
    lr_grid: tuple[float, ...]  # module-wise lr, chosen on VanGL, used by VanGL and TRGL
    e2e_lr_grid: tuple[float, ...]
    tau_grid: tuple[float, ...]
    seq_seeds: tuple[int, ...]  # sequential and multilap, at the smallest size
    seq_epochs: int  # per module
    pipeline_epochs: int
    pipeline_ranks: int
    fullset_seeds: tuple[int, ...] = ()  # the whole training set (train size 0)
    fullset_epochs: int = 1
    fewer_modules: tuple[int, ...] = ()  # the same network cut into fewer modules
    extra_flags: tuple[str, ...] = ()

    @property
    def sweep_size(self) -> int:
        return self.sizes[0]

    def epochs_for(self, size: int) -> int:
        if size == 0:
            return self.fullset_epochs
        return self.epochs[self.sizes.index(size)]


KM_RESNET = ("--model", "km-resnet", "--width", "16")

FULL = Preset(
    name="full",
    dataset="fashion-mnist",
    model_flags=KM_RESNET,
    blocks=16,
    modules=16,
    batch_size=64,
    sizes=(600, 1200, 6000),
    epochs=(16, 8, 4),
    seeds=(0, 1, 2),
    val_size=1000,
    lr_grid=(0.01, 0.05),
    e2e_lr_grid=(0.03, 0.1),
    tau_grid=(0.1, 0.5, 2.0, 10.0),
    seq_seeds=(0, 1, 2),
    seq_epochs=8,
    pipeline_epochs=16,
    pipeline_ranks=2,
    fullset_seeds=(0,),
    fullset_epochs=1,
    fewer_modules=(4,),
)

QUICK = replace(
    FULL,
    name="quick",
    sizes=(600, 1200),
    epochs=(3, 2),
    seeds=(0, 1),
    lr_grid=(0.05,),
    e2e_lr_grid=(0.1,),
    tau_grid=(1.0, 10.0),
    seq_seeds=(0,),
    seq_epochs=1,
    pipeline_epochs=1,
    fullset_seeds=(),
)

# The tiny synthetic run of the tests: QUICK's grids and seeds on a 4-block network.
SMOKE = replace(
    QUICK,
    name="smoke",
    dataset="synthetic",
    model_flags=("--model", "km-resnet", "--width", "4"),
    blocks=4,
    modules=4,
    batch_size=32,
    sizes=(96, 192),
    epochs=(1, 1),
    val_size=64,
    e2e_lr_grid=(0.05,),
    tau_grid=(0.5, 2.0),
    fewer_modules=(2,),
    extra_flags=("--synthetic-train", "384", "--synthetic-test", "128"),
)

PRESETS = {p.name: p for p in (SMOKE, QUICK, FULL)}


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``method`` is vanilla, trgl or e2e; ``size`` 0 is the full set."""

    phase: str
    method: str
    regime: str
    size: int
    seed: int
    epochs: int
    lr: float
    tau: float = 1.0
    validation: bool = False
    final_eval_only: bool = True  # --eval-every 0: the test set scored after the last epoch only
    modules: int = 0  # 0: the preset's K

    @property
    def run_id(self) -> str:
        tau = f"-tau{self.tau:g}" if self.method == "trgl" else ""
        split = "-val" if self.validation else ""
        k = f"-K{self.modules}" if self.modules else ""
        return (
            f"{self.phase}-{self.method}-{self.regime}-n{self.size}-e{self.epochs}"
            f"-lr{self.lr:g}{tau}{k}-s{self.seed}{split}"
        )


def train_flags(preset: Preset, spec: RunSpec) -> list[str]:
    """The `python -m trgl_dist.train` flags of one run (without --out)."""
    regime = "parallel" if spec.regime == "pipeline" else spec.regime
    method = "vanilla" if spec.method == "e2e" else spec.method
    modules = spec.modules or preset.modules
    flags = [
        "--dataset",
        preset.dataset,
        *preset.model_flags,
        "--modules",
        str(modules),
        "--blocks-per-module",
        str(preset.blocks // modules),
        *preset.extra_flags,
        "--batch-size",
        str(preset.batch_size),
        "--regime",
        regime,
        "--method",
        method,
        "--tau",
        repr(spec.tau),
        "--tau-schedule",
        "midpoint-double",
        "--train-size",
        str(spec.size),
        "--epochs",
        str(spec.epochs),
        "--lr",
        repr(spec.lr),
        "--schedule",
        "cosine",
        "--seed",
        str(spec.seed),
        "--log-every",
        "1000",
    ]
    if spec.final_eval_only:
        # Per-epoch test scoring (10,000 images through 16 modules) would cost more than an
        # epoch of 600 training samples. A module-wise network is scored once, after its
        # last epoch: in sequential and multilap each module is frozen after its own last
        # epoch, so its score then is its score at the end.
        flags += ["--eval-every", "0"]
    if spec.validation:
        flags += ["--val-size", str(preset.val_size)]
    if spec.regime == "sequential":
        flags += ["--cache-frozen", "true"]
    if spec.regime == "multilap":
        flags += ["--laps", "2"]
    return flags


def lr_sweep(preset: Preset) -> list[RunSpec]:
    size = preset.sweep_size
    epochs = preset.epochs_for(size)
    specs = [
        RunSpec("sweep", "vanilla", "parallel", size, 0, epochs, lr, validation=True)
        for lr in preset.lr_grid
    ]
    specs += [
        RunSpec("sweep", "e2e", "e2e", size, 0, epochs, lr, validation=True)
        for lr in preset.e2e_lr_grid
    ]
    return specs


def tau_sweep(preset: Preset, lr: float) -> list[RunSpec]:
    size = preset.sweep_size
    return [
        RunSpec(
            "sweep", "trgl", "parallel", size, 0, preset.epochs_for(size), lr, tau, validation=True
        )
        for tau in preset.tau_grid
    ]


def method_runs(
    preset: Preset,
    phase: str,
    sizes: tuple[int, ...],
    seeds: tuple[int, ...],
    lr: float,
    e2e_lr: float,
    tau: float,
) -> list[RunSpec]:
    """VanGL, TRGL (parallel regime) and E2E at each size and seed, sizes outermost."""
    specs = []
    for size in sizes:
        epochs = preset.epochs_for(size)
        for seed in seeds:
            specs.append(RunSpec(phase, "vanilla", "parallel", size, seed, epochs, lr, tau))
            specs.append(RunSpec(phase, "trgl", "parallel", size, seed, epochs, lr, tau))
            specs.append(RunSpec(phase, "e2e", "e2e", size, seed, epochs, e2e_lr, tau))
    return specs


def regime_runs(preset: Preset, lr: float, tau: float) -> list[RunSpec]:
    """sequential and multilap at the smallest size, N_k = seq_epochs for every module."""
    size = preset.sweep_size
    return [
        RunSpec("regimes", method, regime, size, seed, preset.seq_epochs, lr, tau)
        for regime in ("sequential", "multilap")
        for seed in preset.seq_seeds
        for method in MODULEWISE
    ]


def module_count_runs(preset: Preset, lr: float, tau: float) -> list[RunSpec]:
    """VanGL and TRGL at the smallest size on the same network cut into fewer modules (the
    main runs are the many-module side), same lr and tau, same seeds."""
    size = preset.sweep_size
    return [
        RunSpec(
            "modules", method, "parallel", size, seed, preset.epochs_for(size), lr, tau, modules=k
        )
        for k in preset.fewer_modules
        for seed in preset.seeds
        for method in MODULEWISE
    ]


def pipeline_pair(preset: Preset, lr: float, tau: float) -> list[RunSpec]:
    """The same TRGL run in the parallel regime and through torchrun, scored every epoch."""
    size = preset.sweep_size
    return [
        RunSpec(
            "pipeline",
            "trgl",
            regime,
            size,
            0,
            preset.pipeline_epochs,
            lr,
            tau,
            final_eval_only=False,
        )
        for regime in ("parallel", "pipeline")
    ]
