"""The federation's clients draw the minibatch their algorithm prescribes."""

from __future__ import annotations

import pytest

import drivepriv.agents.common as common
from drivepriv.config import apply_overrides
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.scenarios import load_scenario


@pytest.mark.parametrize("algorithm, on_policy", [("dqn", False), ("ppo", True)])
def test_replay_clients_sample_the_whole_buffer_and_on_policy_clients_their_rollout(monkeypatch, algorithm, on_policy):
    seen = []
    original = common.ReplayBuffer.sample

    def spy(self, batch_size, rng, recent=None):
        seen.append(recent)
        return original(self, batch_size, rng, recent=recent)

    monkeypatch.setattr(common.ReplayBuffer, "sample", spy)
    settings = {
        "workers": 1,  # the clients in this process, where the spy sees them
        "agent.algorithm": algorithm,
        "federation.clients": 3,
        "federation.rounds": 3,
        "federation.warmup_steps": 60,  # random CartPole episodes end well before: every client has finished some
        "federation.env_steps_per_round": 8,
        "federation.batch_size": 4,
        "attack.rounds": [-1],
    }
    cfg = apply_overrides(load_scenario("cartpole"), [(k.split("."), v) for k, v in settings.items()])
    run_federation(cfg, resolve_attacked(cfg), progress=False)
    assert len(seen) == 9
    if on_policy:
        assert seen == [68, 68, 68] + [8] * 6  # the round's own rollout (warm-up included in round 0)
    else:
        assert seen == [None] * 9
