"""A model Replica that tests can slow down or wedge, on the mock engine: fault injection without
touching production code.

`FaultInjectingReplica` is app.replica's Replica class with two extra methods, called through a
deployment handle. The lab app binds it with a driver over the mock engine (tests/mock_driver.py),
whose knobs they turn:

- `slow_down(step_delay_s)`: every engine step (each prefill and each decode step) sleeps that long,
  a stand-in for a bigger model on a slower device, so a generation lasts long enough to be
  interrupted (killed, cancelled, redeployed) while it runs;
- `wedge()`: the next engine step blocks for good, a stand-in for a device call that never returns.

It keeps the name "Replica", and health and shutdown settings sized for tests: a health check every
second (Serve restarts a replica after three failed checks in a row) and a graceful-shutdown timeout
above the longest slowed generation the tests run. This module must stay importable by Ray workers
(the test cluster puts the repository on their PYTHONPATH).
"""

from __future__ import annotations

from ray import serve

from app.replica import Replica

HEALTH_CHECK_PERIOD_S = 1.0
GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0


class _FaultInjecting(Replica.func_or_class):
    def slow_down(self, step_delay_s: float) -> None:
        """Make every engine step take `step_delay_s` longer (0 restores full speed)."""
        self._driver.engine.step_delay_s = step_delay_s

    def wedge(self) -> None:
        """Block the engine at its next step, forever (until the replica is killed)."""
        self._driver.engine.wedge()


FaultInjectingReplica = serve.deployment(
    _FaultInjecting, name="Replica", health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=10,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
