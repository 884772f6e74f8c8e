"""Markdown tables from the overhead results JSON (every number comes from that file)."""

from __future__ import annotations

from typing import Any

from benchenv import environment_lines, markdown_table

RATIO_HEADER = (
    "K | VanGL step s | TRGL step s | ratio TRGL/VanGL | paired ratio median [min, max] "
    "| target met | per-module ratio"
)


def ratio_table(rows: list[dict[str, Any]], target: float) -> str:
    """One row per K: median step times, their ratio, the paired ratios, per-module ratios."""
    return markdown_table(
        RATIO_HEADER,
        (
            [
                str(r["modules"]),
                f"{r['median_step_s']['vanilla']:.3f}",
                f"{r['median_step_s']['trgl']:.3f}",
                f"{r['ratio']:.3f}",
                f"{r['paired_ratio_median']:.3f} "
                f"[{r['paired_ratio_min']:.3f}, {r['paired_ratio_max']:.3f}]",
                "yes" if r["ratio"] <= target else "no",
                " ".join(f"{x:.3f}" for x in r["per_module_ratio"]),
            ]
            for r in rows
        ),
    )


def profile_table(profile: dict[str, Any]) -> str:
    """The ops whose self CPU time per step differs most between the methods."""
    head = (
        f"K = {profile['modules']}, CPU ms per step of each autograd backward node "
        "(torch.profiler, the node's kernels included), most extra TRGL time first:\n\n"
    )
    return head + markdown_table(
        "backward node | VanGL ms | TRGL ms | TRGL - VanGL ms",
        (
            [
                f"`{r['op']}`",
                f"{r['vanilla_ms']:.1f}",
                f"{r['trgl_ms']:.1f}",
                f"{r['extra_ms']:+.1f}",
            ]
            for r in profile["ops"]
        ),
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
            "### The same with W in the autograd graph "
            "(`trgl_dist.method.literal_local_loss`, the literal loss)\n",
            ratio_table(results["graph"], target),
            "### Where the extra time goes: trgl_dist\n",
            profile_table(results["profile"]["package"]),
            "### Where the extra time goes: W in the autograd graph\n",
            profile_table(results["profile"]["graph"]),
            environment_lines(results["environment"]),
        ]
    )
