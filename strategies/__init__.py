"""One module per method; the registry maps the config's strategy name to both halves."""

from __future__ import annotations

from .base import PFLStrategy
from .client_base import ClientMethod
from .clustered import Clustered, ClusteredClient, ClusteredPerClient, ClusteredPerClientClient
from .ditto import Ditto, DittoClient
from .fedavg import FedAvg, FedAvgClient
from .fedavg_ft import FedAvgFT, FedAvgFTClient
from .fedbn import FedBN, FedBNClient
from .fedclup import FedCLUP, FedCLUPClient
from .fedprox import FedProx, FedProxClient
from .fedslr import FedSLR, FedSLRClient
from .ifca import IFCA, IFCAClient
from .lgmix import LGMix, LGMixClient
from .local import Local, LocalClient
from .pfml import PFML, PFMLClient

REGISTRY: dict[str, tuple[type[PFLStrategy], type[ClientMethod]]] = {
    "fedavg": (FedAvg, FedAvgClient),
    "fedavg_ft": (FedAvgFT, FedAvgFTClient),
    "fedprox": (FedProx, FedProxClient),
    "fedbn": (FedBN, FedBNClient),
    "local": (Local, LocalClient),
    "ditto": (Ditto, DittoClient),
    "lgmix": (LGMix, LGMixClient),
    "clustered": (Clustered, ClusteredClient),
    "clustered_per_client": (ClusteredPerClient, ClusteredPerClientClient),
    "ifca": (IFCA, IFCAClient),
    "pfml": (PFML, PFMLClient),
    "fedclup": (FedCLUP, FedCLUPClient),
    "fedslr": (FedSLR, FedSLRClient),
}


def lookup(name: str) -> tuple[type[PFLStrategy], type[ClientMethod]]:
    """Both halves of the method ``name``; a clear error lists the valid names."""
    if name not in REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; valid: {sorted(REGISTRY)}")
    return REGISTRY[name]
