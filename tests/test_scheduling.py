"""A rank's helper threads under SCHED_BATCH, its compute thread untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# In a process of its own: the policy of the test runner's threads is not the test's to change.
PROBE = textwrap.dedent(
    """
    import json, os, threading, tempfile
    import torch.distributed as dist
    from trgl_dist.scheduling import yield_to_compute
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # Gloo's C++ threads
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    changed = yield_to_compute()
    policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
    stop.set()
    print(json.dumps({"changed": changed, "main": threading.get_native_id(),
                      "helper": helper.native_id, "policies": policies}))
    """
)


def test_every_thread_but_the_compute_one_stops_preempting_it():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    policies = {int(tid): policy for tid, policy in seen["policies"].items()}
    assert policies.pop(seen["main"]) == os.SCHED_OTHER
    assert policies[seen["helper"]] == os.SCHED_BATCH
    assert len(policies) >= 3  # the Python helper and Gloo's threads
    assert set(policies.values()) == {os.SCHED_BATCH}
    assert seen["changed"] == len(policies)
