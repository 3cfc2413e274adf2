"""The Flower engine and the curious-server strategy (optional extra drivepriv[flower]).

- the in-process and the Flower engine give the same federation, digit for digit;
- ``drivepriv eval --engine flower`` writes a report;
- without Flower, asking for it says which install command to run;
- the example Flower app, run with Flower's own tooling (``flwr run``), is audited: the
  captured updates are exactly what the clients' recorded minibatches produce, and
  ``drivepriv audit`` writes a scored report.
"""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drivepriv.cli import build_config, main, make_parser
from drivepriv.errors import ConfigError
from drivepriv.federation.inprocess import resolve_attacked
from drivepriv.federation.run import run_federation

ROOT = Path(__file__).resolve().parents[2]

flower = pytest.importorskip("flwr", reason='the Flower extra is not installed (pip install -e ".[flower]")')


def _federation(*argv: str):
    cfg = build_config(make_parser().parse_args(["eval", "--scenario", "merge", "--quick", *argv]))
    return run_federation(cfg, resolve_attacked(cfg), progress=False)


def _assert_same(a, b) -> None:
    assert list(a.final_params) == list(b.final_params)
    for k in a.final_params:
        assert torch.equal(a.final_params[k], b.final_params[k]), k
    assert [(v.round, v.client, v.batch_size, v.strategy) for v in a.views] == [(v.round, v.client, v.batch_size, v.strategy) for v in b.views]
    for va, vb in zip(a.views, b.views):
        assert all(torch.equal(x, y) for x, y in zip(va.payload, vb.payload))
        assert all(torch.equal(va.params[k], vb.params[k]) and torch.equal(va.target_params[k], vb.target_params[k]) for k in va.params)
        assert type(va.loss) is type(vb.loss) and va.lr == vb.lr and va.local_steps == vb.local_steps
    assert sorted(a.truths) == sorted(b.truths)
    for key, ta in a.truths.items():
        tb = b.truths[key]
        assert ta.local_steps == tb.local_steps
        assert all(np.array_equal(x, y) for x, y in zip(ta.arrays().values(), tb.arrays().values()))
        assert np.array_equal(ta.origins, tb.origins)
    assert a.training.equals(b.training)
    assert a.privacy == b.privacy


@pytest.mark.parametrize(
    "argv",
    [
        ["--clients", "3", "--rounds", "3"],
        # FedAvg over 2 local steps under DP-SGD: the accountant's sample rates travel in the replies
        ["--clients", "2", "--rounds", "2", "--set", "federation.strategy=fedavg", "--set", "federation.local_steps=2", "--defense", "dpsgd:noise=0.5,clip=1"],
        # client sampling: 2 of 4 clients a round, every round attacked (the sampled ones are seen)
        ["--clients", "4", "--rounds", "3", "--set", "federation.fraction=0.5", "--set", "attack.rounds=all"],
    ],
    ids=["fedsgd", "fedavg-dpsgd", "sampled"],
)
def test_flower_engine_gives_the_inprocess_federation(argv):
    inprocess = _federation(*argv)
    on_flower = _federation(*argv, "--engine", "flower")
    assert on_flower.views, "the curious strategy captured nothing"
    _assert_same(inprocess, on_flower)


def test_eval_on_flower_writes_a_report_with_the_inprocess_metrics(tmp_path, capsys):
    runs = {}
    for engine in ("flower", "inprocess"):
        out = tmp_path / engine
        rc = main(["eval", "--scenario", "merge", "--engine", engine, "--clients", "3", "--quick", "--attacks", "rgia-k,dlg",
                   "--set", "attack.clients=[]", "--out", str(out), "--no-progress"])
        assert rc == 0, engine
        (runs[engine],) = (out / "merge").iterdir()
    run = runs["flower"]
    assert (run / "report.html").is_file() and not run.name.endswith(".incomplete")
    assert "engine: flower" in (run / "config.yaml").read_text()
    import pandas as pd

    on_flower, inprocess = (pd.read_csv(runs[e] / "metrics.csv") for e in ("flower", "inprocess"))
    assert sorted(set(on_flower["client"])) == [0, 1, 2]  # the last round of every client was attacked
    assert on_flower["ego_pos_err_m"].notna().all()
    assert (pd.read_csv(runs["flower"] / "training.csv")).equals(pd.read_csv(runs["inprocess"] / "training.csv"))
    # the same metrics, rgia-k included, digit for digit (docs/reproducibility.md)
    assert on_flower.equals(inprocess)


def test_without_flower_the_engine_says_how_to_install(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_flower(name, *args, **kwargs):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flower)
    from drivepriv.federation.flower_support import require_flower

    with pytest.raises(ConfigError, match=r'pip install -e "\.\[flower\]"'):
        require_flower()
    rc = main(["eval", "--scenario", "merge", "--engine", "flower", "--quick", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "flwr is not installed" in err and "[flower]" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_train_writes_the_model(tmp_path, capsys):
    rc = main(["train", "--scenario", "merge", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    (run,) = (tmp_path / "merge").iterdir()
    state = torch.load(run / "model.pt")
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {"training.csv", "privacy_utility.json", "config.yaml", "versions.json", "run.json"} <= {p.name for p in run.iterdir()}
    assert "drivepriv train" in (run / "run.json").read_text()


@pytest.mark.skipif(shutil.which("flwr") is None, reason="the flwr command is not on PATH")
def test_flower_app_audited_with_flowers_own_tooling(tmp_path):
    """eval/flower_app: a FedAvg DQN app run by `flwr run`; its CuriousStrategy's capture is
    exactly what each client's recorded minibatches give, and drivepriv audit scores it."""
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home")}
    quick = ["--set", "attack.iterations=30", "--set", "attack.restarts=2", "--set", "attack.dynamics.rollout_steps=40",
             "--set", "attack.dynamics.epochs=5", "--set", "report.videos=0", "--attacks", "rgia-k,dlg", "--no-progress"]
    done = subprocess.run(["bash", str(ROOT / "eval/flower_app/run_audit.sh"), str(out), *quick], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from drivepriv.agents.common import Batch
    from drivepriv.agents.dqn import DQNLossSpec
    from drivepriv.federation.curious import load_capture
    from drivepriv.federation.flower_support import load_truth

    sys.path.insert(0, str(ROOT / "eval/flower_app"))
    try:
        from merge_app.task import Net
    finally:
        sys.path.remove(str(ROOT / "eval/flower_app"))
    views = load_capture(out / "capture")
    assert [(v.round, v.client) for v in views] == [(r, c) for r in (0, 3) for c in range(4)]
    net = Net()
    for v in views:
        truth = load_truth(out / "truth", v.round, v.client)
        local = dict(v.params)
        for s in range(truth.local_steps):  # the client's local SGD steps, replayed from its own record
            b = truth.step(s)
            batch = Batch(*(torch.as_tensor(x) for x in (b.states, np.eye(5, dtype=np.float32)[b.actions], b.rewards, b.next_states, b.dones)))
            grads = DQNLossSpec(gamma=0.99).gradient(net, local, v.target_params, batch)
            local = {k: (p - v.lr * g).detach() for (k, p), g in zip(local.items(), grads)}
        for k, d in zip(v.params, v.payload):
            assert torch.allclose(local[k] - v.params[k], d, atol=1e-6), (v.round, v.client, k)
    (run,) = [p for p in (out / "merge").iterdir()]
    assert (run / "report.html").is_file()
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 2 * 8 and set(metrics["attack"]) == {"rgia-k", "dlg"}
    assert (metrics["local_steps"] == 2).all() and metrics["ego_pos_err_m"].notna().all()
    assert not subprocess.run(["pgrep", "-f", f"flower-superlink.*{tmp_path}"], capture_output=True).stdout  # no SuperLink left behind


def test_curious_strategy_checks_what_it_is_told():
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from drivepriv.agents.dqn import DQNLossSpec
    from drivepriv.federation.curious import CuriousStrategy

    with pytest.raises(ConfigError, match="needs lr"):  # a weights payload is a delta of SGD steps at lr
        CuriousStrategy(FedAvg(), loss=DQNLossSpec(gamma=0.99), payload="weights", batch_size=8)
    with pytest.raises(ConfigError, match="secure aggregation"):
        CuriousStrategy(FedAvg(), loss=DQNLossSpec(gamma=0.99), payload="delta", lr=0.1, local_steps=2, batch_size=8, aggregate_only=True)
    watching = CuriousStrategy(FedAvg(), loss=DQNLossSpec(gamma=0.99), payload="gradient", batch_size=8, rounds=[0, -4, 7])
    with pytest.raises(ConfigError, match=r"rounds \[7\] do not exist in a run of 4 rounds"):
        watching.start(None, ArrayRecord(), num_rounds=4)


def _view(client: int, batch_size: int, model: torch.nn.Module, rnd: int = 2):
    from drivepriv.agents.dqn import DQNLossSpec
    from drivepriv.federation.types import ServerView

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    payload = tuple(torch.zeros_like(v) for v in params.values())
    return ServerView(rnd, client, "fedsgd", params, params, payload, batch_size, 1, 0.01, DQNLossSpec(gamma=0.99))


def test_audit_scores_a_secure_aggregate_against_every_clients_minibatch(tmp_path):
    from drivepriv.capture import capture_truths
    from drivepriv.federation.flower_support import save_truth

    rng = np.random.default_rng(0)
    batches = {}
    for client in (1, 0, 2):
        b = {"states": rng.random((3, 5, 7), dtype=np.float32), "actions": np.eye(5, dtype=np.float32)[[0, 1, 2]],
             "rewards": rng.random(3, dtype=np.float32), "next_states": rng.random((3, 5, 7), dtype=np.float32), "dones": np.zeros(3, np.float32)}
        save_truth(tmp_path, 2, client, [b], [np.zeros((3, 2), np.int64)], continuous=False)
        batches[client] = b
    model = torch.nn.Sequential(torch.nn.Linear(35, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    truths = capture_truths([_view(-1, 9, model), _view(1, 3, model)], tmp_path)
    merged = truths[(2, -1)].states
    assert np.array_equal(merged, np.concatenate([batches[c]["states"] for c in (0, 1, 2)]))  # in client order
    assert np.array_equal(truths[(2, 1)].rewards, batches[1]["rewards"])
    assert np.array_equal(truths[(2, 1)].actions, [0, 1, 2])  # one-hot rows as the client trained on them, indices in the truth
    with pytest.raises(ConfigError, match="capture says 1 local step"):
        capture_truths([_view(1, 8, model)], tmp_path)
    with pytest.raises(ConfigError, match="no truth for round 5, client 1"):
        capture_truths([_view(1, 3, model, rnd=5)], tmp_path)


def test_audit_rejects_a_model_that_is_not_the_captured_one(tmp_path):
    from drivepriv.capture import audit_capture

    captured = torch.nn.Sequential(torch.nn.Linear(35, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    other = torch.nn.Sequential(torch.nn.Linear(35, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    with pytest.raises(ConfigError, match="not the model's parameters"):
        audit_capture([_view(0, 3, captured)], other, "merge", truth_dir=tmp_path, out=tmp_path)
    assert not (tmp_path / "merge").exists()
