"""The federation's clients draw the minibatch their algorithm prescribes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import drivepriv.agents.common as common
from drivepriv.attacks.base import AttackInput
from drivepriv.attacks.engine import simulate_update
from drivepriv.config import apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation
from drivepriv.pipeline import attack_input
from drivepriv.scenarios import load_scenario

SMALL = {
    "workers": 1,  # the clients in this process, where the spies see them
    "federation.clients": 3,
    "federation.rounds": 3,
    "federation.warmup_steps": 60,  # random CartPole episodes end well before: every client has finished some
    "federation.env_steps_per_round": 8,
    "federation.batch_size": 4,
    "attack.rounds": [-1],
}


def cartpole(**settings):
    return apply_overrides(load_scenario("cartpole"), [(k.split("."), v) for k, v in {**SMALL, **settings}.items()])


def spy_on_minibatches(monkeypatch) -> list[tuple[str, int]]:
    """Records, for each minibatch a client draws, how it was drawn and how far back in the
    buffer its oldest transition lies (0: the last one added)."""
    seen: list[tuple[str, int]] = []
    sample, take = common.ReplayBuffer.sample, common.ReplayBuffer.take

    def spy_sample(self, batch_size, rng):
        seen.append(("replay", -1))
        return sample(self, batch_size, rng)

    def spy_take(self, idx, adv_next=None):
        if not seen or seen[-1][0] != "replay":
            seen.append(("rollout", int(((self._next - 1 - np.asarray(idx)) % self.capacity).max())))
        return take(self, idx, adv_next)

    monkeypatch.setattr(common.ReplayBuffer, "sample", spy_sample)
    monkeypatch.setattr(common.ReplayBuffer, "take", spy_take)
    return seen


@pytest.mark.parametrize("algorithm", ["dqn", "ppo"])
def test_replay_clients_sample_the_whole_buffer_and_on_policy_clients_their_rollout(monkeypatch, algorithm):
    seen = spy_on_minibatches(monkeypatch)
    run_federation(cartpole(**{"agent.algorithm": algorithm}), resolve_attacked(cartpole()), progress=False)
    assert len(seen) == 9
    if algorithm == "ppo":
        kinds, backs = zip(*seen)
        assert set(kinds) == {"rollout"}
        assert max(backs[:3]) < 68 and max(backs[3:]) < 8  # the round's own rollout (warm-up included in round 0)
    else:
        assert [k for k, _ in seen] == ["replay"] * 9


def test_ppo_passes_over_the_rollout_in_minibatches(monkeypatch):
    """2 passes x 2 minibatches of 4 over a rollout of 8: each pass covers the rollout once in its
    own order; the truth holds the first pass's 8 distinct transitions."""
    drawn: list[np.ndarray] = []
    take = common.ReplayBuffer.take

    def spy_take(self, idx, adv_next=None):
        drawn.append(np.sort(np.asarray(idx)))
        assert adv_next is not None and np.isfinite(adv_next).all()  # GAE's A_next travels with the minibatch
        return take(self, idx, adv_next)

    monkeypatch.setattr(common.ReplayBuffer, "take", spy_take)
    settings = {"agent.algorithm": "ppo", "agent.gae_lambda": 0.95, "agent.ppo_epochs": 2, "federation.strategy": "fedavg", "federation.local_steps": 4}
    cfg = cartpole(**settings)
    result = run_federation(cfg, resolve_attacked(cfg), progress=False)
    assert len(drawn) == 3 * 3 * 4
    for c in range(9):  # every client in every round
        steps = drawn[4 * c : 4 * c + 4]
        first, second = np.concatenate(steps[:2]), np.concatenate(steps[2:])
        assert len(np.unique(first)) == 8 and np.array_equal(np.sort(first), np.sort(second))
    truth = next(iter(result.truths.values()))
    assert len(truth) == 8 and truth.local_steps == 2
    view = result.views[0]
    assert view.local_steps == 4 and view.loss.epochs == 2 and view.loss.gae_lambda == 0.95
    # the attacks look for the 8 distinct transitions: 2 steps at twice the rate, to first order
    inp = attack_input(result.model, view, None, (4,), 2)
    assert inp.local_steps == 2 and inp.n_transitions == 8 and inp.local_lr == 2 * cfg.federation.lr
    for g, d in zip(inp.gradient, view.payload):
        assert torch.allclose(g, -d / (2 * cfg.federation.lr))


def test_ppo_settings_that_cannot_run_are_clear_errors():
    with pytest.raises(ConfigError, match="need a FedAvg update"):
        run_federation(cartpole(**{"agent.algorithm": "ppo", "agent.ppo_epochs": 2}), set(), progress=False)
    with pytest.raises(ConfigError, match="must divide federation.local_steps"):
        run_federation(cartpole(**{"agent.algorithm": "ppo", "agent.ppo_epochs": 2, "federation.strategy": "fedavg", "federation.local_steps": 3}), set(), progress=False)
    with pytest.raises(ConfigError, match="raise federation.env_steps_per_round to at least 12"):
        run_federation(cartpole(**{"agent.algorithm": "ppo", "federation.strategy": "fedavg", "federation.local_steps": 3}), set(), progress=False)
    with pytest.raises(ConfigError, match="gae_lambda"):
        cartpole(**{"agent.gae_lambda": 1.5})
    with pytest.raises(ConfigError, match="delayed actor updates are TD3's"):
        cartpole(**{"agent.algorithm": "ppo", "agent.policy_delay": 2})
    with pytest.raises(ConfigError, match="policy_delay: expected an integer >= 1"):
        cartpole(**{"agent.policy_delay": 0})


@pytest.mark.parametrize("strategy, local_steps", [("fedsgd", 1), ("fedavg", 3)])
def test_delayed_td3_clients_train_the_actor_every_second_step_and_the_server_knows_which(strategy, local_steps):
    """Delayed policy updates (agent.policy_delay=2) count training steps over the run: FedSGD's
    round r is step r, FedAvg's local step k of round r is step 3 r + k. The server's view holds
    the loss of the round's first step, and replaying the client's local steps with it from the
    recorded minibatches gives exactly the shared payload."""
    settings = {**SMALL, "federation.clients": 1, "attack.rounds": [0, 1], "federation.strategy": strategy,
                "federation.local_steps": local_steps, "agent.algorithm": "td3", "agent.policy_delay": 2}
    cfg = apply_overrides(load_scenario("pendulum"), [(k.split("."), v) for k, v in settings.items()])
    fed = run_federation(cfg, resolve_attacked(cfg), progress=False)
    assert [v.round for v in fed.views] == [0, 1]
    for view in fed.views:
        first = view.round * local_steps
        assert view.loss.iteration == first and view.loss.policy_delay == 2
        truth = fed.truths[(view.round, view.client)]
        params = {k: v.clone() for k, v in view.params.items()}
        for k in range(local_steps):
            rows = slice(k * cfg.federation.batch_size, (k + 1) * cfg.federation.batch_size)
            batch = common.Batch(*(torch.as_tensor(getattr(truth, f)[rows]) for f in ("states", "actions", "rewards", "next_states", "dones")))
            g = common.at_step(view.loss, k).gradient(fed.model, params, view.target_params, batch)
            params = {n: p - cfg.federation.lr * gn for (n, p), gn in zip(params.items(), g)} if strategy == "fedavg" else params
        replayed = g if strategy == "fedsgd" else tuple(params[n] - view.params[n] for n in params)
        if strategy == "fedavg":  # the attacks' model of the local run (engine.simulate_update) is the same
            inp = AttackInput(fed.model, view.params, view.target_params, view.gradient(), view.loss, view.batch_size, (3,), 1, None,
                              local_steps=local_steps, local_lr=view.lr, delta=view.payload)
            whole = common.Batch(*(torch.as_tensor(getattr(truth, f)) for f in ("states", "actions", "rewards", "next_states", "dones")))
            for mine, theirs in zip(replayed, simulate_update(inp, whole)):
                assert torch.allclose(mine, theirs, atol=1e-6)
        for name, mine, shared in zip(view.params, replayed, view.payload):
            assert torch.allclose(mine, shared, atol=1e-6), (view.round, name)
            if name.startswith("actor."):  # FedSGD: round 0 critic-only, round 1 not; FedAvg: step 1 or 3 and 5
                assert (shared.abs().max() > 0) == (strategy == "fedavg" or view.round == 1), (view.round, name)
