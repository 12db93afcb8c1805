"""A federation held in memory: every client's train, validation and test tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ClientData:
    """One client's train and test split (and optional validation split), as tensors.

    ``domain`` is the client's ground-truth domain or cluster id, ``domain_name`` its name.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    domain: int
    domain_name: str
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.y_val is None else int(self.y_val.shape[0])


@dataclass
class Federation:
    """All clients of one dataset/partition config."""

    clients: list[ClientData]
    num_classes: int
    input_shape: tuple[int, int, int]
    domain_names: tuple[str, ...]


def client_on(data: ClientData, device: torch.device | str) -> ClientData:
    """``data`` with its tensors on ``device`` (the same object where they are there already)."""
    tensors = {k: v.to(device) for k, v in vars(data).items() if isinstance(v, torch.Tensor)}
    if all(t is getattr(data, k) for k, t in tensors.items()):
        return data
    return dataclasses.replace(data, **tensors)


class DeviceClients(Sequence):
    """A federation's clients, each moved to ``device`` when first read, then kept there.

    A process moves the data of the clients it serves, not the whole federation: a simulated
    ClientApp actor or a SuperNode serves some of the clients, and on a GPU every process
    copying every client's data would cost start-up time and device memory for nothing.
    """

    def __init__(self, clients: Sequence[ClientData], device: torch.device | str):
        self._source, self._device = clients, device
        self._moved: dict[int, ClientData] = {}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int | slice) -> ClientData | list[ClientData]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # a negative index as a list's, IndexError past the end
        if i not in self._moved:
            self._moved[i] = client_on(self._source[i], self._device)
        return self._moved[i]

    def moved(self) -> list[int]:
        """The clients whose data this process has on the device."""
        return sorted(self._moved)
