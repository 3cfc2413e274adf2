"""ClientApp: receive the global Q-network, drive, train locally, send the new weights back."""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from merge_app.task import Net, collect, seed_of, td_loss

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    torch.set_num_threads(1)
    client = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"]) - 1  # 0-based, as drivepriv counts rounds
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    target = copy.deepcopy(net)  # the round's global model is the target network
    data, origins = collect(net, int(cfg["env-steps"]), float(cfg["epsilon"]), seed_of(cfg["seed"], client, rnd))
    rng = np.random.default_rng(seed_of(cfg["seed"], client, rnd, "minibatch"))
    lr, batch = float(cfg["lr"]), int(cfg["batch-size"])
    batches, used, losses = [], [], []
    for _ in range(int(cfg["local-steps"])):
        idx = rng.choice(len(data["rewards"]), size=batch, replace=False)
        b = {k: v[idx] for k, v in data.items()}
        t = {k: torch.as_tensor(v) for k, v in b.items()}
        loss = td_loss(net, target, t["states"], t["actions"], t["rewards"], t["next_states"], t["dones"], float(cfg["gamma"]))
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():  # plain SGD
            for p, g in zip(net.parameters(), grads):
                p.sub_(lr * g)
        batches.append(b)
        used.append(origins[idx])
        losses.append(float(loss))
    if cfg.get("out-dir"):
        # The audit's record of what the client really trained on (its own disk; the server
        # never receives it). Only drivepriv's metrics read it.
        from drivepriv.federation.flower_support import save_truth

        save_truth(f"{cfg['out-dir']}/truth", rnd, client, batches, used, continuous=False)
    metrics = MetricRecord({"num-examples": batch * len(batches), "partition-id": client, "train-loss": float(np.mean(losses))})
    return Message(content=RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)
