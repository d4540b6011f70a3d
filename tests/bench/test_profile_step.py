"""bench.profile_step: an XLA profile of the decode step, summed by op kind (run as its own process,
since the CPU per-op events need an XLA flag set before JAX starts)."""

import json
import subprocess
import sys

from tests.cluster import REPO_ROOT


def test_profile_sums_the_steps_ops_by_kind():
    done = subprocess.run([sys.executable, "-m", "bench.profile_step", "--checkpoint", "tiny", "--batch", "2",
                           "--steps", "3", "--top", "4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert (report["batch"], report["steps"]) == (2, 3)
    assert report["by_kind"].get("dot", 0) > 0, report["by_kind"]  # the matmuls are there, by name
    assert abs(sum(report["by_kind"].values()) - report["traced_ms_per_step"]) < 0.01 * report["traced_ms_per_step"] + 0.01
    assert len(report["top_ops"]) == 4 and all(ms > 0 for _, ms in report["top_ops"])
    assert not any(name.startswith(("$", "ThunkExecutor")) for name, _ in report["top_ops"])  # host events left out
