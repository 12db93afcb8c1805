"""FML (Shen, Zhang, Jia, Zhang, Huang, Zhou, Kuang, Wu, Wu, 2020): federated mutual learning of
a personal local model and a shared meme model.

    T. Shen et al. "Federated Mutual Learning". https://arxiv.org/abs/2006.16765.
    Reference code: PFLlib (system/flcore/servers/serverfml.py, clients/clientfml.py).

Client i keeps its local model l_i (the first meme it receives, at first) and trains the
received meme m = w_g beside it; on every batch, with p = softmax of each model's logits and
the peer's output fixed (detached), both step together:
    L_local = alpha CE(l_i) + (1 - alpha) KL(p_meme || p_local)
    L_meme  = beta  CE(m)   + (1 - beta)  KL(p_local || p_meme)
upload m; keep l_i.
    server: w_g <- sum_{i in S_t} p_i m_i,   p_i = n_i / sum_{j in S_t} n_j
Personal accuracy is l_i's; global accuracy is w_g's.

The KL is averaged over the batch (``kl_reduction=batchmean``, the paper's per-sample KL).
PFLlib's code uses torch's ``nn.KLDivLoss()`` default, which also divides by the number of
classes (``kl_reduction=mean``), does not detach the peer (each loss also sends a gradient
into the other model) and clips each model's gradient norm at 10. pflower detaches the peer
(each model learns from the other's current prediction, as in deep mutual learning), steps
both models together on the same batch, as PFLlib does, and does not clip.

PFML (strategies/pfml.py) is FML's successor; in its terms FML is K = 0 (no pFedMe-style inner
proximal steps, lam unused), beta = 1 (the server takes FedAvg's full step), T = 1, and convex
weights per model instead of CE + kappa KL: L_local = alpha (CE + ((1 - alpha) / alpha) KL), so
FML's local model follows PFML's m with kappa = (1 - alpha) / alpha and a step alpha eta, and
FML's meme its w with kappa = (1 - beta) / beta and a step beta eta. PFML also keeps m across
rounds by default and weights CE by 1 for both models; FML gives the two models their own
alpha and beta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from task.core.params import message_state, model_state
from task.core.training import batches
from task.run.schema import Field, register_strategy_schema

from .base import Method
from .client_base import ClientMethod, TrainResult

register_strategy_schema("fml", {
    "alpha": Field(float, 0.0, 1.0), "beta": Field(float, 0.0, 1.0),
    "kl_reduction": Field(str, choices=("batchmean", "mean")),
})


def kl_to_peer(logits: torch.Tensor, peer_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_peer || p_self), the peer detached; ``mean`` also divides by the class count."""
    log_self = F.log_softmax(logits, dim=1)
    log_peer = F.log_softmax(peer_logits.detach(), dim=1)
    return F.kl_div(log_self, log_peer, reduction=reduction, log_target=True)


def fml_losses(z_local: torch.Tensor, z_meme: torch.Tensor, y: torch.Tensor, alpha: float,
               beta: float, reduction: str = "batchmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_local, L_meme) of the module docstring on one batch."""
    loss_local = alpha * F.cross_entropy(z_local, y) + (1 - alpha) * kl_to_peer(z_local, z_meme, reduction)
    loss_meme = beta * F.cross_entropy(z_meme, y) + (1 - beta) * kl_to_peer(z_meme, z_local, reduction)
    return loss_local, loss_meme


class FML(Method):
    """Server half: FedAvg over the uploaded memes."""

    name = "fml"
    keeps_client_state = True


class FMLClient(ClientMethod):
    """Client half: local and meme model trained by mutual learning; upload the meme."""

    name = "fml"

    def train(self, received, config):
        server_round = int(config["server-round"])
        s = self.cfg.strategy
        local = self.model("personal", self.state.load("personal") or received)
        meme = self.model("global", received)
        lr = self.round_lr(server_round)
        opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=float(self.cfg.get("momentum", 0.0)),
                                weight_decay=float(self.cfg.get("weight_decay", 0.0))) for m in (local, meme)]
        local.train()
        meme.train()
        x, y = self.data.x_train, self.data.y_train
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in local.modules())
        gen = self.generator(server_round)
        totals, steps = [0.0, 0.0], 0
        for _ in range(int(self.cfg.local_epochs)):
            for idx in batches(len(y), int(self.cfg.batch_size), gen, x.device,
                               bool(self.cfg.get("drop_last", False))):
                if len(idx) < 2 and has_bn:
                    continue  # BatchNorm cannot train on a single sample
                l_local, l_meme = fml_losses(local(x[idx]), meme(x[idx]), y[idx], float(s.alpha),
                                             float(s.beta), str(s.kl_reduction))
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                (l_local + l_meme).backward()  # peers detached: each loss reaches its own model
                for opt in opts:
                    opt.step()
                totals[0] += float(l_local.detach())
                totals[1] += float(l_meme.detach())
                steps += 1
        self.state.save("personal", model_state(local))
        n = max(steps, 1)
        return TrainResult(message_state(meme.state_dict()), self.data.num_train,
                           {"train_loss": totals[1] / n, "personal_loss": totals[0] / n})

    def evaluate(self, received, config):
        local = self.model("personal", self.state.load("personal") or received)
        return self.report(local, self.model("global", received))
