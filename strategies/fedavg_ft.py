"""FedAvg-FT: FedAvg, then the global model fine-tuned on each client before it is scored.

    training:   exactly FedAvg
    evaluation: v_i <- SGD_{ft_epochs}(w_g; CE on D_i);  score v_i on the client's test split
The baseline that tells whether a personalization method buys anything beyond fine-tuning.
"""

from __future__ import annotations

from task.run.schema import COUNT, Field, register_strategy_schema

from .base import Method
from .fedavg import FedAvgClient

register_strategy_schema("fedavg_ft", {
    "ft_epochs": COUNT,
    "ft_lr": Field(float, 0.0, low_open=True, nullable=True),
})


class FedAvgFT(Method):
    """Server half: as FedAvg."""

    name = "fedavg_ft"


class FedAvgFTClient(FedAvgClient):
    """Client half: FedAvg's training; evaluation fine-tunes a copy of w_g first."""

    name = "fedavg_ft"

    def evaluate(self, received, config):
        tuned = self.model("finetuned", received)
        ft_lr = self.cfg.strategy.ft_lr
        # Stream 2 and the round keep fine-tuning batches apart from training batches.
        self.fit(tuned, int(config["server-round"]), epochs=int(self.cfg.strategy.ft_epochs),
                 lr=None if ft_lr is None else float(ft_lr), stream=2)
        return self.report(tuned, self.model("main", received))
