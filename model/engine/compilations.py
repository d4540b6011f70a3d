"""The process-wide XLA compilation counter: how servers and tests prove "zero compilations after
warm-up".

Every backend compile in this process, on any thread, reports a `jax.monitoring` event; the counter
listens for it. The listener is registered on first use (`compilation_count()`), not at import, so
importing an engine has no process-wide side effect; engines call it before they compile anything.
"""

from __future__ import annotations

import threading

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_count = 0
_listening = False


def _on_event(event: str, duration: float, **_kwargs) -> None:
    global _count
    if event == _COMPILE_EVENT:
        with _lock:
            _count += 1


def compilation_count() -> int:
    """XLA compilations in this process since the counter started listening (its first call)."""
    global _listening
    with _lock:
        if not _listening:
            import jax

            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
        return _count
