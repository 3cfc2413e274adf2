"""PPO's loss on the minibatch a client shares the gradient of (actor-critic, discrete actions).

The network is one MLP with A + 1 outputs: the A action logits, then the state value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from drivepriv.agents.dqn import Batch


@dataclass(frozen=True)
class PPOLossSpec:
    """PPO's loss at the first minibatch of an update, exactly: the mean over the batch of

        -A_i * ratio_i + vf_coef * (V(s_i) - R_i)^2 - ent_coef * H(pi(.|s_i))

    with ratio_i = pi(a_i|s_i) / pi_old(a_i|s_i) = 1 in value (the data was collected with the
    parameters being trained, so nothing is clipped and its gradient is that of log pi), the
    one-step return R_i = r_i + gamma * (1 - done_i) * V_target(s'_i) and the advantage
    A_i = R_i - V(s_i), both detached (GAE with lambda = 0, no advantage normalisation).

    Returns and advantages are unknowns of the attacker, tied to the reward and the next state
    by this definition and to the scenario's reward and transition priors through them. GAE
    with lambda > 0 sums over a trajectory the gradient does not show; it is not covered.
    """

    gamma: float
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    name: str = "ppo"

    def heads(self, model: nn.Module, params: dict[str, Tensor], states: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (.., A), value (..,)) of the actor-critic."""
        out = functional_call(model, params, (states,))
        return out[..., :-1], out[..., -1]

    def returns(self, model: nn.Module, target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        target = {k: v.detach() for k, v in target_params.items()}
        _, v_next = self.heads(model, target, batch.next_states)
        return batch.rewards + self.gamma * (1.0 - batch.dones) * v_next

    def __call__(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch) -> Tensor:
        logits, value = self.heads(model, params, batch.states)
        logp = torch.log_softmax(logits, -1)
        ret = self.returns(model, target_params, batch)
        # detached from theta (the attacker's unknowns r, s', done stay in the graph)
        adv = ret - value.detach()
        logp_a = (logp * batch.actions).sum(-1)
        ratio = torch.exp(logp_a - logp_a.detach())  # 1 in value, d ratio = d log pi
        policy = -(adv * ratio).mean()
        value_loss = ((value - ret) ** 2).mean()
        entropy = -(logp.exp() * logp).sum(-1).mean()
        return policy + self.vf_coef * value_loss - self.ent_coef * entropy

    def gradient(self, model: nn.Module, params: dict[str, Tensor], target_params: dict[str, Tensor], batch: Batch, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Gradient of the loss w.r.t. ``params`` (in ``params`` order)."""
        params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        loss = self(model, params, target_params, batch)
        return torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
