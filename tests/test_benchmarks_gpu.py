"""The GPU check with --cpu end to end, through its own command (bash launch/gpu-check.sh):
seven PASS lines and every check in the results file."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["bash", str(REPO / "launch" / "gpu-check.sh")]
COMMITTED = REPO / "benchmarks" / "gpu" / "results" / "cpu_check.json"
CHECKS = ["e2e", "parallel", "pipeline", "fifo-equality", "throughput", "memory", "killed-rank"]
# A hard deadline, not a timing assert (about 45 s alone on a 2-core machine). The script's
# own budget ends its runs first, so it can still kill them and write its results.
TIMEOUT_S = 240
BUDGET_S = 180


def _run(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [*COMMAND, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script kills its children on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        raise AssertionError(
            f"gpu-check.sh still running after {TIMEOUT_S} s:\n{out[-3000:]}"
        ) from None
    return proc.returncode, out, err


def test_cpu_check_passes_and_writes_every_check(tmp_path: Path) -> None:
    committed = COMMITTED.read_bytes() if COMMITTED.exists() else None
    results = tmp_path / "results"
    args = ["--cpu", "--work-dir", str(tmp_path / "work"), "--results-dir", str(results)]
    code, out, err = _run([*args, "--budget", str(BUDGET_S)])
    killed_log = tmp_path / "work" / "killed.log"
    said = killed_log.read_text()[-3000:] if killed_log.exists() else ""
    assert code == 0, out[-3000:] + err[-3000:] + said
    lines = out.splitlines()
    verdicts = [line for line in lines if line.startswith(("PASS ", "FAIL "))]
    assert [line.split(":")[0] for line in verdicts] == [f"PASS {c}" for c in CHECKS], out
    assert lines[-1] == "gpu-check: 7/7 checks passed"
    data = json.loads((results / "cpu_check.json").read_text())
    assert (data["passed"], data["total"]) == (7, 7)
    assert [(c["check"], c["status"]) for c in data["checks"]] == [(c, "PASS") for c in CHECKS]
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"]
    assert "--cpu" in data["machine"]["command"]
    assert set(data["runs"]) == {"e2e", "parallel", "pipeline", "killed-rank"}
    assert data["runs"]["pipeline"]["command"].startswith("torchrun --standalone")
    by_name = {c["check"]: c["numbers"] for c in data["checks"]}
    assert by_name["pipeline"]["stages"] == [0, 1, 2, 3]
    assert by_name["pipeline"]["devices"] == ["cpu"] * 4
    assert by_name["fifo-equality"]["max_abs_diff"] <= 1e-5
    assert by_name["fifo-equality"]["outside_tolerance"] == []
    assert by_name["throughput"]["ratio"] > 0 and not by_name["throughput"]["judged"]
    memory = by_name["memory"]
    assert memory["key"] == "peak_tensor_mb" and len(memory["stages_mb"]) == 4
    assert all(v < memory["e2e_mb"] for v in memory["stages_mb"])
    killed = by_name["killed-rank"]
    assert killed["exit_code"] not in (0, None) and killed["exit_after_kill_s"] <= 40
    assert killed["named"] and killed["survivors"] == []
    assert "| killed-rank | **PASS** |" in (results / "cpu_check.md").read_text()
    # The committed results (and the README table) are the real run's, never the test's.
    assert (COMMITTED.read_bytes() if COMMITTED.exists() else None) == committed
