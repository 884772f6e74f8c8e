"""The named experiments of the accuracy study (version 2): presets and run specs."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Module-wise methods (parallel regime) and E2E (plain back-propagation).
MODULEWISE = ("vanilla", "trgl")
METHOD_LABELS = {"vanilla": "VanGL", "trgl": "TRGL", "multipliers": "TRGL-mult", "e2e": "E2E"}
#: Multipliers' (h, every, init): lambda_k starts at init and grows by h * CE every `every` steps.
Mult = tuple[float, int, float]


@dataclass(frozen=True)
class Preset:
    """Everything that sizes one mode of the study; the grids are searched on validation only."""

    name: str
    dataset: str
    width: int
    blocks: int  # residual blocks of the network, one per module in the main runs (K = blocks)
    batch_size: int
    sizes: tuple[int, ...]
    epochs: tuple[int, ...]  # per entry of ``sizes``: enough for E2E's training accuracy to level
    seeds: tuple[int, ...]
    sweep_seeds: tuple[int, ...]  # the validation sweeps' seeds (their own training subsets)
    val_size: int  # held out of the training set, scored instead of the test set by the sweeps
    lr_size: int  # the train size at which the lr of VanGL/TRGL and of E2E are chosen
    lr_grid: tuple[float, ...]  # module-wise lr, chosen on VanGL, used by VanGL, TRGL, mult
    e2e_lr_grid: tuple[float, ...]
    tau_grid: tuple[float, ...]  # searched at every train size
    mult_sizes: tuple[int, ...]  # the multipliers variant runs at these sizes
    mult_grid: tuple[Mult, ...]
    deep_size: int  # the same blocks cut into fewer, deeper modules, at this size
    deep_modules: int
    eval_size: int = 0  # test images scored (0: all 10,000)
    extra_flags: tuple[str, ...] = ()

    def epochs_for(self, size: int) -> int:
        return self.epochs[self.sizes.index(size)]


FULL = Preset(
    name="full",
    dataset="fashion-mnist",
    width=16,
    blocks=20,
    batch_size=32,
    sizes=(150, 300, 600, 1200),
    epochs=(80, 60, 40, 40),
    seeds=tuple(range(10)),
    sweep_seeds=(100,),
    val_size=1000,
    lr_size=300,
    lr_grid=(0.02, 0.05, 0.1),
    e2e_lr_grid=(0.05, 0.1, 0.2),
    tau_grid=(0.5, 2.0, 8.0),
    mult_sizes=(150, 300),
    mult_grid=((0.1, 10, 1.0), (0.5, 10, 1.0), (0.1, 10, 4.0)),
    deep_size=300,
    deep_modules=4,
)

# Two sizes, three seeds, short training, one sweep seed: the whole pipeline, under 10 minutes.
QUICK = replace(
    FULL,
    name="quick",
    sizes=(150, 300),
    epochs=(12, 8),
    seeds=(0, 1, 2),
    sweep_seeds=(100,),
    lr_grid=(0.05,),
    e2e_lr_grid=(0.1,),
    tau_grid=(0.5, 4.0),
    mult_grid=((0.1, 10, 1.0),),
    eval_size=2000,
)

# The tiny synthetic run of the tests: two sizes, two seeds, a 4-block network cut into 4 or 2.
SMOKE = replace(
    QUICK,
    name="smoke",
    dataset="synthetic",
    width=4,
    blocks=4,
    batch_size=32,
    sizes=(96, 192),
    epochs=(1, 1),
    seeds=(0, 1),
    val_size=64,
    lr_size=96,
    tau_grid=(0.5, 2.0),
    mult_sizes=(96,),
    deep_size=96,
    deep_modules=2,
    eval_size=0,
    extra_flags=("--synthetic-train", "512", "--synthetic-test", "128"),
)

PRESETS = {p.name: p for p in (SMOKE, QUICK, FULL)}


@dataclass(frozen=True)
class RunSpec:
    """One training run; ``method`` is vanilla, trgl, multipliers or e2e."""

    phase: str  # lr, tau, mult (validation sweeps), main, deep
    method: str
    size: int
    seed: int
    epochs: int
    lr: float
    tau: float = 1.0  # TRGL only
    mult: Mult | None = None  # multipliers only
    validation: bool = False
    modules: int = 0  # 0: one module per block

    @property
    def regime(self) -> str:
        return "e2e" if self.method == "e2e" else "parallel"

    @property
    def run_id(self) -> str:
        tau = f"-tau{self.tau:g}" if self.method == "trgl" else ""
        mult = f"-h{self.mult[0]:g}-s{self.mult[1]}-i{self.mult[2]:g}" if self.mult else ""
        k = f"-K{self.modules}" if self.modules else ""
        split = "-val" if self.validation else ""
        return (
            f"{self.phase}-{self.method}-n{self.size}-e{self.epochs}-lr{self.lr:g}"
            f"{tau}{mult}{k}-s{self.seed}{split}"
        )

    def record(self) -> dict[str, object]:
        """The spec's fields as a runs.jsonl record carries them."""
        return {
            "phase": self.phase,
            "method": self.method,
            "regime": self.regime,
            "size": self.size,
            "seed": self.seed,
            "epochs": self.epochs,
            "lr": self.lr,
            "tau": self.tau,
            "mult": list(self.mult) if self.mult else None,
            "validation": self.validation,
            "modules": self.modules,
        }


def train_flags(preset: Preset, spec: RunSpec) -> list[str]:
    """The `python -m trgl_dist.train` flags of one run (without --out)."""
    modules = spec.modules or preset.blocks
    method = "vanilla" if spec.method == "e2e" else spec.method
    flags = [
        *("--dataset", preset.dataset, "--model", "km-resnet", "--width", str(preset.width)),
        *("--modules", str(modules), "--blocks-per-module", str(preset.blocks // modules)),
        *preset.extra_flags,
        *("--batch-size", str(preset.batch_size), "--augment", "false"),
        *("--regime", spec.regime, "--method", method),
        *("--tau", repr(spec.tau), "--tau-schedule", "midpoint-double"),
        *("--train-size", str(spec.size), "--epochs", str(spec.epochs), "--seed", str(spec.seed)),
        *("--lr", repr(spec.lr), "--schedule", "cosine"),
        # Scored once, after the last epoch; a train record per module at each epoch's end
        # only (never mid-epoch), so the last one is the last epoch's training accuracy.
        *("--eval-every", "0", "--log-every", "1000000", "--keep-checkpoints", "1"),
    ]
    if spec.mult:
        h, every, init = spec.mult
        flags += ["--multiplier-h", repr(h), "--multiplier-every", str(every)]
        flags += ["--multiplier-init", repr(init)]
    if spec.validation:
        flags += ["--val-size", str(preset.val_size)]
    elif preset.eval_size:
        flags += ["--eval-size", str(preset.eval_size)]
    return flags
