"""Markdown tables from the overhead results JSON (every number comes from that file)."""

from __future__ import annotations

from typing import Any


def ratio_table(rows: list[dict[str, Any]], target: float) -> str:
    """One row per K: median step times, their ratio, the paired ratios, per-module ratios."""
    head = (
        "| K | VanGL step s | TRGL step s | ratio TRGL/VanGL | paired ratio median [min, max] "
        "| target met | per-module ratio |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        median = r["median_step_s"]
        modules = " ".join(f"{x:.3f}" for x in r["per_module_ratio"])
        lines.append(
            f"| {r['modules']} | {median['vanilla']:.3f} | {median['trgl']:.3f} "
            f"| {r['ratio']:.3f} | {r['paired_ratio_median']:.3f} "
            f"[{r['paired_ratio_min']:.3f}, {r['paired_ratio_max']:.3f}] "
            f"| {'yes' if r['ratio'] <= target else 'no'} | {modules} |"
        )
    return head + "\n".join(lines) + "\n"


def profile_table(profile: dict[str, Any]) -> str:
    """The ops whose self CPU time per step differs most between the methods."""
    head = (
        f"K = {profile['modules']}, CPU ms per step of each autograd backward node "
        "(torch.profiler, the node's kernels included), most extra TRGL time first:\n\n"
        "| backward node | VanGL ms | TRGL ms | TRGL - VanGL ms |\n|---|---|---|---|\n"
    )
    lines = [
        f"| `{r['op']}` | {r['vanilla_ms']:.1f} | {r['trgl_ms']:.1f} | {r['extra_ms']:+.1f} |"
        for r in profile["ops"]
    ]
    return head + "\n".join(lines) + "\n"


def environment_lines(env: dict[str, Any]) -> str:
    """Machine, versions and the exact command, from the results file."""
    return (
        f"Machine: {env['cpu_model']}, {env['cpus']} CPUs, {env.get('memory_gib', '?')} GiB, "
        f"{env['platform']}, {env['libc']}. Python {env['python']}, torch {env['torch']}, "
        f"torchvision {env['torchvision']}. Command: `{env['command']}`\n"
    )


def report(results: dict[str, Any]) -> str:
    s = results["setting"]
    target = results["target"]
    return "\n".join(
        [
            f"Model {s['model']} at {s['channels']}x{s['size']}x{s['size']}, batch "
            f"{s['batch_size']}, lock-step steps (forward, local loss, backward, SGD step of "
            f"every module), 1 thread, {s['warmup']} warm-up + {s['steps']} timed steps per "
            f"method, interleaved. Target: ratio <= {target}.\n",
            "### TRGL vs VanGL: trgl_dist (transport gradient added by hooks)\n",
            ratio_table(results["package"], target),
            "### The same with W in the autograd graph (graph_loss.py, the literal loss)\n",
            ratio_table(results["graph"], target),
            "### Where the extra time goes: trgl_dist\n",
            profile_table(results["profile"]["package"]),
            "### Where the extra time goes: W in the autograd graph\n",
            profile_table(results["profile"]["graph"]),
            environment_lines(results["environment"]),
        ]
    )
