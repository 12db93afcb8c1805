"""One module per method; the registry maps the config's strategy name to both halves."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method
    from .client_base import ClientMethod

# name -> (module, server class, client class). Modules are imported when looked up, so a
# deployed ClientApp (a fresh process per message in Flower's default isolation) imports its
# own method only.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "fedavg": ("fedavg", "FedAvg", "FedAvgClient"),
    "fedavg_ft": ("fedavg_ft", "FedAvgFT", "FedAvgFTClient"),
    "fedprox": ("fedprox", "FedProx", "FedProxClient"),
    "fedbn": ("fedbn", "FedBN", "FedBNClient"),
    "local": ("local", "Local", "LocalClient"),
    "ditto": ("ditto", "Ditto", "DittoClient"),
    "lgmix": ("lgmix", "LGMix", "LGMixClient"),
    "clustered": ("clustered", "Clustered", "ClusteredClient"),
    "clustered_per_client": ("clustered_per_client", "ClusteredPerClient", "ClusteredPerClientClient"),
    "ifca": ("ifca", "IFCA", "IFCAClient"),
    "pfml": ("pfml", "PFML", "PFMLClient"),
    "fedclup": ("fedclup", "FedCLUP", "FedCLUPClient"),
    "fedslr": ("fedslr", "FedSLR", "FedSLRClient"),
    "fedper": ("fedper", "FedPer", "FedPerClient"),
    "fedrep": ("fedrep", "FedRep", "FedRepClient"),
    "fedbabu": ("fedbabu", "FedBABU", "FedBABUClient"),
    "lgfedavg": ("lgfedavg", "LGFedAvg", "LGFedAvgClient"),
    "apfl": ("apfl", "APFL", "APFLClient"),
    "fedrod": ("fedrod", "FedRoD", "FedRoDClient"),
    "fml": ("fml", "FML", "FMLClient"),
    "pfedme": ("pfedme", "PFedMe", "PFedMeClient"),
    "perfedavg": ("perfedavg", "PerFedAvg", "PerFedAvgClient"),
    "cfl": ("cfl", "CFL", "CFLClient"),
}


def load_all() -> None:
    """Import every method module (each declares its config schema on import)."""
    for module in sorted({m for m, _, _ in REGISTRY.values()}):
        import_module(f"{__name__}.{module}")


def lookup(name: str) -> tuple[type[Method], type[ClientMethod]]:
    """Both halves of the method ``name``; a clear error lists the valid names."""
    if name not in REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; valid: {sorted(REGISTRY)}")
    module, server, client = REGISTRY[name]
    found = import_module(f"{__name__}.{module}")
    return getattr(found, server), getattr(found, client)
