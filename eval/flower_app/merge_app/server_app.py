"""ServerApp: Flower's FedAvg, wrapped by drivepriv's curious server, which keeps each client's
update of the audited rounds and saves them for ``drivepriv audit``."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from drivepriv.agents.dqn import DQNLossSpec
from drivepriv.federation.curious import CuriousStrategy
from merge_app.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if not cfg.get("out-dir"):
        raise ValueError("set out-dir to an absolute folder: flwr run . --run-config \"out-dir='/abs/path'\"")
    out = Path(str(cfg["out-dir"]))
    n = int(cfg["num-clients"])
    torch.manual_seed(int(cfg["seed"]))
    net = Net()
    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy = CuriousStrategy(
        fedavg,
        loss=DQNLossSpec(gamma=float(cfg["gamma"])),
        payload="weights",  # the clients send their weights after local-steps SGD steps at lr
        lr=float(cfg["lr"]),
        local_steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        rounds=[int(r) for r in str(cfg["audit-rounds"]).split(",")],
        client_key="partition-id",
    )
    result = strategy.start(grid, ArrayRecord(net.state_dict()), num_rounds=int(cfg["num-server-rounds"]))
    strategy.save(out / "capture")
    torch.save(result.arrays.to_torch_state_dict(), out / "final_model.pt")
