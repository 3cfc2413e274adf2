"""What limits exact recovery from a FedAvg delta (issue 14's FedAvg goals), in numbers.

    python eval/diagnose_fedavg.py [--local-steps 3] [--batch-size 8] [--lr 0.003] [--width 256] [--seeds 0 1]

A client on the default merge scenario's untrained DQN (35-W-W-5) runs K plain SGD steps at
``lr``, each on a fresh minibatch of B real merge transitions (uniformly random driving), and
shares its delta in float32 (new minus old parameters, as a real client does). Per seed it prints:

1. Each layer's singular values of [dW | db] around n = K x B, relative to the layer's largest:
   the n-th and the (n+1)-th. A layer whose n-th value stands clear of the (n+1)-th (the float32
   rounding of the parameters) carries all n rank-one terms; one where they run together has
   terms below its rounding (transitions whose terms differ little from the others').
2. How exactly the whole delta determines the batch, and from how far: from the true states plus
   Gaussian noise of std sigma (normalised units; 0.002 is 1 m of ego x), and the true TD targets,
   one Gauss-Newton step on the float64 simulation of the K local steps, weighted by each
   parameter's float32 spacing. Printed: the largest state error before and after, and the
   weighted residual (about entries / 12 at the truth: the rounding alone).

This is a diagnosis on the truth, like eval/diagnose.py: no attack reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, jacfwd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivepriv.agents.dqn import QNetwork  # noqa: E402
from drivepriv.config import RunConfig  # noqa: E402
from drivepriv.envs import make_env  # noqa: E402


def merge_transitions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n (s, a, s') of merge, random driving, environment seeds from ``seed`` on."""
    env = make_env(RunConfig().env)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    s, a, s2 = [], [], []
    while len(s) < n:
        act = int(rng.integers(5))
        nxt, _, term, trunc, _ = env.step(act)
        s.append(obs), a.append(act), s2.append(nxt)
        obs = nxt
        if term or trunc:
            obs, _ = env.reset(seed=seed + len(s))
    env.close()
    return np.stack(s), np.array(a), np.stack(s2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3])
    args = ap.parse_args()
    K, B, lr = args.local_steps, args.batch_size, args.lr
    n = K * B
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = QNetwork(35, 5, [args.width, args.width])
        s, a, s2 = merge_transitions(4 * n, 10_000 + seed)
        pick = np.random.default_rng(seed).choice(len(s), n, replace=False)
        x = torch.as_tensor(s[pick]).reshape(n, -1)
        acts = torch.nn.functional.one_hot(torch.as_tensor(a[pick]), 5).float()
        p0 = {k: v.detach() for k, v in model.named_parameters()}
        with torch.no_grad():  # TD targets: rewards in (0.2, 0.9) plus the target network's value of s'
            q_next = functional_call(model, p0, (torch.as_tensor(s2[pick]).reshape(n, -1),)).max(-1).values
        y = torch.as_tensor(np.random.default_rng(seed).uniform(0.2, 0.9, n), dtype=torch.float32) + 0.99 * q_next

        def simulate(X, Y, A, params, dtype):
            p = {k: v.to(dtype) for k, v in params.items()}
            start = dict(p)
            for k in range(K):
                sl = slice(k * B, (k + 1) * B)

                def loss(q):
                    return torch.nn.functional.smooth_l1_loss((functional_call(model, q, (X[sl],)) * A[sl]).sum(-1), Y[sl])

                g = grad(loss)(p)
                p = {m: p[m] - lr * g[m] for m in p}
            return p, start

        new, _ = simulate(x, y, acts, p0, torch.float32)  # the client, in float32
        delta = [(new[k] - p0[k]).double() for k in p0]
        spacing = [torch.as_tensor(np.spacing(np.abs(new[k].numpy()))).double() for k in p0]
        print(f"seed {seed}: K = {K}, B = {B}, lr = {lr}, width {args.width}; n = {n} transitions")
        names = list(p0)
        for layer in range(len(names) // 2):
            m = torch.cat([delta[2 * layer], delta[2 * layer + 1][:, None]], dim=1)
            sv = torch.linalg.svdvals(m)
            sv = sv / sv[0]
            nth = f"{float(sv[n - 1]):.2e}" if n - 1 < len(sv) else "-"
            after = f"{float(sv[n]):.2e}" if n < len(sv) else "- (no rank room)"
            print(f"  layer {layer}: singular values n-th {nth}, (n+1)-th {after}")
        torch.set_default_dtype(torch.float64)
        model.double()
        X0, Y0, A = x.double(), y.double(), acts.double()

        def residual(z):
            X, Y = z[: n * 35].reshape(n, 35), z[n * 35 :]
            sim, start = simulate(X, Y, A, p0, torch.float64)
            return torch.cat([((sim[k] - start[k] - d) / sp).reshape(-1) for k, d, sp in zip(names, delta, spacing)])

        truth = torch.cat([X0.reshape(-1), Y0])
        r0 = float((residual(truth) ** 2).sum())
        print(f"  weighted residual at the truth: {r0:.3g} over {sum(d.numel() for d in delta)} entries")
        gen = torch.Generator().manual_seed(seed)
        for sigma in args.sigmas:
            z = truth.clone()
            z[: n * 35] += sigma * torch.randn(n * 35, generator=gen)
            r = residual(z)
            step = torch.linalg.lstsq(jacfwd(residual)(z), -r[:, None], driver="gelsd").solution[:, 0]
            z2 = z + step
            err = lambda v: float((v[: n * 35] - truth[: n * 35]).abs().max())  # noqa: E731
            print(f"  sigma {sigma:g}: max state error {err(z):.2e} -> {err(z2):.2e} after one step; weighted residual {float((r ** 2).sum()):.3g} -> {float((residual(z2) ** 2).sum()):.3g}")
        torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
