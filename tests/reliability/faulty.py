"""A model Replica that tests can slow down or wedge: fault injection without touching production code.

`FaultInjectingReplica` is app.replica's Replica class with two extra methods, called through a
deployment handle. Both act on the driver's stepping thread by wrapping the driver's `step` (the
loop calls `self.step()` each round, so an instance attribute takes over from the next step on):

- `slow_down(step_delay_s)`: every engine step sleeps that long first, a stand-in for a bigger model
  on a slower device, so a generation lasts long enough to be interrupted (killed, cancelled,
  redeployed) while it runs;
- `wedge()`: the next step blocks for good, a stand-in for a device call that never returns.

The tests put it in place of the real Replica by patching `app.builder.Replica` while they build
their own application (a different name and route prefix from the shared one). It keeps the name
"Replica", and health and shutdown settings sized for tests: a health check every second (Serve
restarts a replica after three failed checks in a row) and a graceful-shutdown timeout above the
longest slowed generation the tests run. This module must stay importable by Ray workers (the test
cluster puts the repository on their PYTHONPATH).
"""

from __future__ import annotations

import threading
import time

from ray import serve

from app.replica import Replica

HEALTH_CHECK_PERIOD_S = 1.0
GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0


class _FaultInjecting(Replica.func_or_class):
    _step_delay_s = 0.0
    _wedged: threading.Event | None = None

    def slow_down(self, step_delay_s: float) -> None:
        """Make every engine step take `step_delay_s` longer (0 restores full speed)."""
        self._wrap_step()
        self._step_delay_s = step_delay_s

    def wedge(self) -> None:
        """Block the engine loop at its next step, forever (until the replica is killed)."""
        self._wrap_step()
        self._wedged.set()

    def _wrap_step(self) -> None:
        if self._wedged is not None:
            return
        self._wedged = threading.Event()
        driver = self._driver
        real_step = driver.step
        never = threading.Event()

        def step() -> None:  # on the driver's stepping thread
            if self._wedged.is_set():
                never.wait()
            if self._step_delay_s:
                time.sleep(self._step_delay_s)
            real_step()

        driver.step = step


FaultInjectingReplica = serve.deployment(
    _FaultInjecting, name="Replica", health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=10,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
