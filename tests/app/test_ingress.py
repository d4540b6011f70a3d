"""app.ingress without Ray: what the CPU deployments load."""

import subprocess
import sys

from tests.cluster import REPO_ROOT

# Everything the ingress and batcher processes import (model.ckpt too, for the ingress's tokenizer);
# the builder imports app.replica as well, which may import JAX only inside functions.
CPU_DEPLOYMENT_IMPORTS = "import app.ingress, app.batcher, app.builder"


def test_the_cpu_deployments_never_import_jax():
    """The ingress and the batcher run on CPU-only actors (on a TPU host nothing but the replica may
    open the chips), and importing JAX would cost them seconds and memory for nothing."""
    code = (f"import sys; {CPU_DEPLOYMENT_IMPORTS}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"JAX was imported: {result.stdout.strip()[:500]}"
