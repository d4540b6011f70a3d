"""The TPU workers' preStop hook: waits for the node's Serve replicas to leave, never blocks forever."""

from __future__ import annotations

import pytest

from kuberay import drain


def fake_clock():
    now = [0.0]
    return (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s)), now


def test_waits_until_no_replica_is_left():
    clock, sleep, now = fake_clock()
    remaining = iter([2, 1, 1, 0])
    assert drain.wait_until_drained(lambda: next(remaining), deadline_s=60, poll_s=2, clock=clock, sleep=sleep)
    assert now[0] == 6


def test_gives_up_at_the_deadline():
    clock, sleep, now = fake_clock()
    assert not drain.wait_until_drained(lambda: 1, deadline_s=10, poll_s=3, clock=clock, sleep=sleep)
    assert 10 <= now[0] < 13


def test_drain_command_names_the_node_reason_and_deadline():
    command = drain.drain_command("ab" * 28, 270)
    assert command[:2] == ["ray", "drain-node"]
    assert command[command.index("--node-id") + 1] == "ab" * 28
    assert command[command.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
    assert command[command.index("--deadline-remaining-seconds") + 1] == "270"


def test_a_failure_never_blocks_termination(monkeypatch, capsys):
    import ray

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    assert drain.main(["--deadline-s", "270"]) == 0
    assert "not drained (ConnectionError" in capsys.readouterr().err


def test_deadline_is_required():
    with pytest.raises(SystemExit):
        drain.main([])
