"""Defenses: each transform does what its paper says, DP-SGD's epsilon is Opacus's, secure
aggregation shows the server exactly the mean of the clients' updates, and bad specs fail clearly."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from drivepriv.agents.common import ReplayBuffer
from drivepriv.agents.dqn import DQNLossSpec, QNetwork
from drivepriv.config import apply_overrides
from drivepriv.errors import ConfigError
from drivepriv.federation.defenses import DPSGD, DefenseStack, PrivacyAccountant, make_defense, parse_defense
from drivepriv.federation.inprocess import _row
from drivepriv.federation.run import run_federation
from drivepriv.scenarios import load_scenario


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(64, (5, 7), 5)
    for i in range(32):
        buf.add(rng.normal(size=(5, 7)).astype(np.float32) * 0.3, int(rng.integers(5)), float(rng.normal()), rng.normal(size=(5, 7)).astype(np.float32) * 0.3, bool(i % 9 == 0), 0, i)
    batch, _ = buf.sample(n, rng)
    torch.manual_seed(seed)
    model = QNetwork(35, 5, [32, 32])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params, batch


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_dpsgd_without_noise_or_clipping_is_the_batch_gradient():
    model, params, batch = _batch()
    spec = DQNLossSpec(gamma=0.99)
    per_sample = [spec.gradient(model, params, params, _row(batch, i)) for i in range(len(batch))]
    dp = DPSGD(noise=0.0, clip=1e9)
    got = _flat(dp.privatize(per_sample, torch.Generator().manual_seed(0)))
    want = _flat(spec.gradient(model, params, params, batch))
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_dpsgd_clips_each_sample_and_adds_noise_of_the_stated_scale():
    model, params, batch = _batch()
    spec = DQNLossSpec(gamma=0.99)
    per_sample = [spec.gradient(model, params, params, _row(batch, i)) for i in range(len(batch))]
    norms = [float(_flat(g).norm()) for g in per_sample]
    clip = 0.5 * min(norms)  # every sample is clipped
    clean = _flat(DPSGD(noise=0.0, clip=clip).privatize(per_sample, torch.Generator().manual_seed(0)))
    expected = sum(_flat(g) * (clip / n) for g, n in zip(per_sample, norms)) / len(batch)
    assert torch.allclose(clean, expected, atol=1e-6)
    assert float(clean.norm()) <= clip + 1e-6
    noisy = _flat(DPSGD(noise=2.0, clip=clip).privatize(per_sample, torch.Generator().manual_seed(1)))
    std = float((noisy - clean).std())
    assert std == pytest.approx(2.0 * clip / len(batch), rel=0.05)  # sigma * C / B over ~2,500 coordinates


def test_epsilon_is_opacus_and_falls_as_noise_grows():
    from opacus.accountants import RDPAccountant

    eps = []
    for noise in (0.5, 1.0, 3.0):
        acc = PrivacyAccountant(DPSGD(noise=noise, clip=1.0), clients=2)
        for _ in range(20):
            acc.step(0, 0.1)
            acc.step(1, 0.05)
        ref = RDPAccountant()
        for _ in range(20):
            ref.step(noise_multiplier=noise, sample_rate=0.1)
        assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5, alphas=PrivacyAccountant.ALPHAS))  # the worse client
        assert acc.epsilon() <= ref.get_epsilon(delta=1e-5) + 1e-9  # more orders: never a looser bound than Opacus's defaults
        eps.append(acc.epsilon())
    assert eps[0] > eps[1] > eps[2] > 0
    assert math.isinf(PrivacyAccountant(DPSGD(noise=0.0), 1).epsilon())


def test_update_defenses():
    gen = torch.Generator().manual_seed(0)
    payload = (torch.randn(40, 30, generator=gen), torch.randn(30, generator=gen))
    flat = _flat(payload)
    top = _flat(make_defense("topk:fraction=0.1").apply(payload, gen))
    assert int((top != 0).sum()) == round(0.1 * flat.numel())
    assert float(top.abs()[top != 0].min()) >= float(flat.abs()[top == 0].max())
    q = make_defense({"name": "quantize", "bits": 8}).apply(payload, gen)
    for p, qp in zip(payload, q):
        step = float(p.max() - p.min()) / 255
        assert float((p - qp).abs().max()) <= step / 2 + 1e-6
        assert len(torch.unique(qp)) <= 256
    s = make_defense("sign").apply(payload, gen)
    assert all(torch.equal(torch.sign(a), torch.sign(b)) for a, b in zip(payload, s))
    assert all(len(torch.unique(b.abs())) == 1 for b in s)
    c = _flat(make_defense("clip:max_norm=0.5").apply(payload, gen))
    assert float(c.norm()) == pytest.approx(0.5, rel=1e-5)
    assert torch.allclose(c / c.norm(), flat / flat.norm(), atol=1e-6)
    n = _flat(make_defense("noise:std=0.1").apply(payload, torch.Generator().manual_seed(3)))
    assert float((n - flat).std()) == pytest.approx(0.1, rel=0.1)


def test_bad_specs_fail_with_what_to_do():
    with pytest.raises(ConfigError, match="Did you mean 'noise'"):
        make_defense("dpsgd:nois=1")
    with pytest.raises(ConfigError, match="unknown defense 'topx'"):
        make_defense("topx")
    with pytest.raises(ConfigError, match="fraction must be in"):
        make_defense("topk:fraction=2")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_defense("dpsgd:noise")
    with pytest.raises(ConfigError, match="given 2 times"):
        DefenseStack.from_specs(["dpsgd", "dpsgd:noise=2"])
    assert parse_defense("dpsgd:noise=1.5,clip=2") == {"name": "dpsgd", "noise": 1.5, "clip": 2}


def _quick(**extra):
    cfg = load_scenario("merge")
    over = {"federation.clients": 2, "federation.rounds": 2, "federation.warmup_steps": 12, "federation.env_steps_per_round": 4,
            "federation.batch_size": 4, "federation.eval_episodes": 0, **extra}
    return apply_overrides(cfg, [(k.split("."), v) for k, v in over.items()])


def test_secure_aggregation_shows_only_the_mean_of_the_clients_updates():
    plain = run_federation(_quick(), {(1, 0), (1, 1)}, progress=False)
    agg = run_federation(_quick(**{"federation.defenses": [{"name": "secagg"}]}), {(1, 0)}, progress=False)
    (view,) = agg.views
    assert view.client == -1 and view.batch_size == 2 * 4
    mine = {v.client: v for v in plain.views}
    for p, a, b in zip(view.payload, mine[0].payload, mine[1].payload):
        assert torch.allclose(p, (a + b) / 2)
    truth = agg.truths[(1, -1)]
    assert truth.local_steps == 1 and truth.states.shape[0] == 8


def test_defenses_change_what_the_server_sees_but_not_the_undefended_run():
    base = run_federation(_quick(), {(1, 0)}, progress=False)
    again = run_federation(_quick(), {(1, 0)}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(base.views[0].payload, again.views[0].payload))
    dp = run_federation(_quick(**{"federation.defenses": [{"name": "dpsgd", "noise": 1.0, "clip": 0.1}]}), {(1, 0)}, progress=False)
    assert float(_flat(dp.views[0].payload).norm()) != pytest.approx(float(_flat(base.views[0].payload).norm()))
    assert 0 < dp.privacy["epsilon"] < math.inf
    dp2 = run_federation(_quick(**{"federation.defenses": [{"name": "dpsgd", "noise": 1.0, "clip": 0.1}]}), {(1, 0)}, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(dp.views[0].payload, dp2.views[0].payload))  # seeded noise


def test_cli_defense_writes_epsilon_and_rejects_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "drivepriv", "eval", "--scenario", "merge", "--quick", "--no-progress", "--out", str(tmp_path),
                        "--defense", "dpsgd:noise=1.0,clip=1.0", "--defense", "topk:fraction=0.5", "--attacks", "rgia"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "merge").iterdir()
    pu = json.loads((run_dir / "privacy_utility.json").read_text())
    assert pu["privacy"]["defenses"] == "dpsgd(noise=1, clip=1, delta=1e-05) + topk(fraction=0.5)"
    assert 0 < pu["privacy"]["epsilon"] < 100
    assert {"mean_return", "collision_rate"} <= set(pu["utility"])
    assert "ε = " in (run_dir / "report.html").read_text()
    bad = subprocess.run([sys.executable, "-m", "drivepriv", "eval", "--scenario", "merge", "--quick", "--out", str(tmp_path / "bad"),
                          "--defense", "dpsgd:noise=-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "noise" in bad.stderr and not (tmp_path / "bad").exists()


def test_secure_aggregation_batches_are_named_as_such():
    from drivepriv.results import BatchRecord

    from drivepriv.federation.types import GroundTruth

    def empty(client: int, rnd: int) -> GroundTruth:
        return GroundTruth(rnd, client, *(np.zeros((0,)) for _ in range(5)), origins=np.zeros((0, 2), dtype=np.int64))

    rec = BatchRecord(empty(-1, 3))
    assert rec.stem == "secagg-r3" and "secure aggregation" in rec.label
    assert BatchRecord(empty(2, 3)).stem == "c2-r3"
