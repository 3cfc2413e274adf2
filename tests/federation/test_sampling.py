"""Client sampling (federation.fraction): a stable sample per round, followed by training, the
server's views and the attack plan; the clients spread over worker processes train to the same
numbers as one after another."""

import pytest
import torch

from drivepriv.config import apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.federation.inprocess import resolve_attacked, sampled_clients
from drivepriv.federation.run import run_federation
from drivepriv.pipeline import check_supported
from drivepriv.scenarios import load_scenario


def _cfg(**settings):
    base = {
        "federation.clients": 5,
        "federation.rounds": 4,
        "federation.warmup_steps": 12,
        "federation.env_steps_per_round": 4,
        "federation.batch_size": 4,
        "federation.eval_episodes": 0,
        "attack.rounds": "all",
    }
    return apply_overrides(load_scenario("cartpole"), [(k.split("."), v) for k, v in {**base, **settings}.items()])


def test_the_sample_is_a_function_of_seed_and_round():
    cfg = _cfg(**{"federation.fraction": 0.4})
    samples = [sampled_clients(cfg, r) for r in range(50)]
    assert all(len(s) == 2 and s == sorted(set(s)) and set(s) <= set(range(5)) for s in samples)
    assert samples == [sampled_clients(cfg, r) for r in range(50)]
    assert len({tuple(s) for s in samples}) > 3, "the sample changes from round to round"
    assert samples != [sampled_clients(_cfg(**{"federation.fraction": 0.4, "seed": 1}), r) for r in range(50)]
    assert sampled_clients(_cfg(), 3) == [0, 1, 2, 3, 4]
    assert len(sampled_clients(_cfg(**{"federation.fraction": 0.1, "federation.min_clients": 3}), 0)) == 3


@pytest.mark.parametrize("bad", [{"federation.fraction": 0.0}, {"federation.fraction": 1.5}, {"federation.min_clients": 6}])
def test_impossible_sampling_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="fraction|min_clients"):
        _cfg(**bad)


def test_only_sampled_clients_train_and_are_seen_and_workers_change_nothing():
    cfg = _cfg(**{"federation.fraction": 0.4, "workers": 1})
    serial = run_federation(cfg, resolve_attacked(cfg), progress=False)
    want = {(r, c) for r in range(4) for c in sampled_clients(cfg, r)}
    assert set(zip(serial.training["round"], serial.training["client"])) == want
    assert {(v.round, v.client) for v in serial.views} == want == resolve_attacked(cfg)
    assert set(serial.truths) == want
    # a client's first round brings its warm-up, whichever round that is
    first = serial.training.groupby("client")["env_steps"].min()
    assert (first == 12 + 4).all()
    spread = run_federation(apply_overrides(cfg, [(["workers"], 2)]), resolve_attacked(cfg), progress=False)
    assert serial.training.equals(spread.training)
    assert all(torch.equal(serial.final_params[k], spread.final_params[k]) for k in serial.final_params)
    assert all(all(torch.equal(a, b) for a, b in zip(va.payload, vb.payload)) for va, vb in zip(serial.views, spread.views))


def test_attacking_only_unsampled_clients_fails_before_training():
    cfg = _cfg(**{"federation.fraction": 0.2, "attack.rounds": [0]})
    unsampled = [c for c in range(5) if c not in sampled_clients(cfg, 0)]
    cfg = apply_overrides(cfg, [(["attack", "clients"], unsampled[:1])])
    with pytest.raises(ConfigError, match="none of the attacked clients"):
        check_supported(cfg)


def test_a_clients_error_in_a_worker_process_reaches_the_engine(monkeypatch):
    from drivepriv.federation import inprocess

    original = inprocess.Client.train_round

    def failing(self, rnd, *args, **kwargs):
        if self.cid == 1 and rnd == 1:
            raise ValueError("client 1 could not train")
        return original(self, rnd, *args, **kwargs)

    monkeypatch.setattr(inprocess.Client, "train_round", failing)  # inherited by the forked workers
    cfg = _cfg(**{"workers": 2})
    with pytest.raises(ValueError, match="client 1 could not train"):
        run_federation(cfg, resolve_attacked(cfg), progress=False)


def test_a_killed_client_worker_is_a_clear_error(monkeypatch):
    import os
    import signal

    from drivepriv.errors import DriveprivError
    from drivepriv.federation import inprocess

    original = inprocess.Client.train_round

    def dying(self, rnd, *args, **kwargs):
        if self.cid == 1 and rnd == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        return original(self, rnd, *args, **kwargs)

    monkeypatch.setattr(inprocess.Client, "train_round", dying)
    cfg = _cfg(**{"workers": 2})
    with pytest.raises(DriveprivError, match=r"clients \[1, 3\] died in round 1.*--workers 1"):
        run_federation(cfg, resolve_attacked(cfg), progress=False)
