"""The audit API on a model and a gradient built outside drivepriv's own client code."""

import numpy as np
import pytest
import torch
from torch import nn

from drivepriv.audit import decode_observations, invert_gradients, make_env
from drivepriv.errors import ConfigError

FAST = {"attack.dynamics.rollout_steps": 60, "attack.dynamics.epochs": 3, "attack.iterations": 40, "attack.restarts": 2}


def outside_setup(batch_size: int, seed: int = 0):
    """A user's own MLP (tanh, odd widths) and their own TD-loss gradient on real transitions."""
    torch.manual_seed(seed)
    env = make_env("merge", seed=seed)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    S, A, R, S2, D = [], [], [], [], []
    while len(S) < batch_size:
        a = int(rng.integers(5))
        obs2, r, term, trunc, _ = env.step(a)
        S.append(obs), A.append(a), R.append(r), S2.append(obs2), D.append(float(term))
        obs = obs2
        if term or trunc:
            obs, _ = env.reset(seed=seed + len(S))
    s, s2 = torch.tensor(np.array(S)).flatten(1), torch.tensor(np.array(S2)).flatten(1)
    a, r, d = torch.tensor(A), torch.tensor(R, dtype=torch.float32), torch.tensor(D)
    model = nn.Sequential(nn.Linear(35, 48), nn.Tanh(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
    target = nn.Sequential(nn.Linear(35, 48), nn.Tanh(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        y = r + 0.9 * (1 - d) * target(s2).max(1).values
    loss = nn.functional.smooth_l1_loss(model(s).gather(1, a[:, None]).squeeze(1), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return model, target, grads, np.array(S), np.array(A)


def test_analytic_audit_recovers_batch_of_one():
    model, target, grads, states, actions = outside_setup(1)
    rec = invert_gradients(model, grads, scenario="merge", batch_size=1, target_model=target, gamma=0.9, attack="analytic", seed=0, settings=FAST)
    assert rec.states.shape == (1, 5, 7)
    assert rec.actions[0] == actions[0]
    true = decode_observations("merge", states)
    got = decode_observations("merge", rec.states)
    assert len(got) == len(true)
    assert np.abs(got[["x_m", "y_m"]].to_numpy() - true[["x_m", "y_m"]].to_numpy()).max() < 1e-3
    assert {"x_m", "y_m", "vx_mps", "vy_mps", "speed_mps", "heading_rad"} <= set(got.columns)


def test_rgia_audit_runs_on_a_batch():
    model, target, grads, states, _ = outside_setup(4, seed=1)
    rec = invert_gradients(model, grads, scenario="merge", batch_size=4, target_model=target, gamma=0.9, attack="rgia", seed=0, settings=FAST)
    assert rec.states.shape == (4, 5, 7) and rec.next_states.shape == (4, 5, 7)
    assert rec.rewards.shape == (4,) and rec.dones.shape == (4,) and np.isfinite(rec.grad_distance)


def test_audit_errors_are_clear():
    model, _, grads, _, _ = outside_setup(1)
    with pytest.raises(ConfigError, match="expected 6 tensors"):
        invert_gradients(model, grads[:-1], batch_size=1)
    with pytest.raises(ConfigError, match="algorithm 'sac' is not supported"):
        invert_gradients(model, grads, algorithm="sac")
    with pytest.raises(ConfigError, match="must have 6 .the 5 action logits, then the value."):
        invert_gradients(model, grads, algorithm="ppo")  # a Q-network is not an actor-critic
    bad = nn.Sequential(nn.Linear(10, 5))
    with pytest.raises(ConfigError, match="first layer takes 10 inputs"):
        invert_gradients(bad, list(bad.parameters()), batch_size=1)


def test_readme_audit_example_runs_as_written(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Audit your own system"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transition" in r.stdout and "speed_mps" in r.stdout
