"""Client datasets: the built-in feature-shift digits federation, held as tensors in memory.

The built-in federation needs no download. It takes the 1,797 real handwritten digits that
scikit-learn ships (8x8, 10 classes), upscales them to ``image_size`` RGB and renders each
client's share in one visual domain:

- ``plain``: white digit on black, as MNIST;
- ``inverted``: black digit on white;
- ``textured``: the absolute difference of the digit and a random coloured texture, as
  MNIST-M blends MNIST with BSDS500 patches;
- ``lowres``: downsampled to a third of the size, blurred and with less contrast, as USPS;
- ``rotated``: rotated by 45 degrees;
- ``colored``: a random solid colour for digit and background, as SynthDigits' flat renders.

It is a stand-in for digits-5 (MNIST, SVHN, USPS, SynthDigits, MNIST-M), not digits-5.
Every domain's images are disjoint from every other's; each client's test split is drawn
from its own share, so it follows the client's own distribution.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from task.data.federation import ClientData, Federation

DOMAINS = ("plain", "inverted", "textured", "lowres", "rotated", "colored")


def render_domain(images: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    """Render grey images (N, 1, H, W) in [0, 1] as RGB images of one visual domain."""
    n, _, h, w = images.shape
    rgb = images.expand(n, 3, h, w)
    if domain == "plain":
        out = rgb
    elif domain == "inverted":
        out = 1.0 - rgb
    elif domain == "textured":
        coarse = torch.rand(n, 3, max(h // 4, 2), max(w // 4, 2), generator=gen)
        texture = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        out = (rgb - texture).abs()
    elif domain == "lowres":
        small = F.interpolate(rgb, size=(max(h // 3, 2), max(w // 3, 2)), mode="area")
        blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        out = 0.2 + 0.6 * blurred
    elif domain == "rotated":
        out = _rotate(rgb, 45.0)
    elif domain == "colored":
        fg = torch.rand(n, 3, 1, 1, generator=gen)
        bg = torch.rand(n, 3, 1, 1, generator=gen)
        out = bg + (fg - bg) * rgb
    else:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {list(DOMAINS)}")
    return out.clamp(0.0, 1.0).contiguous()


def _rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    theta = torch.tensor(np.deg2rad(degrees), dtype=images.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    affine = torch.stack([torch.stack([cos, -sin, torch.zeros(())]),
                          torch.stack([sin, cos, torch.zeros(())])]).expand(len(images), 2, 3)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def sklearn_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits (N, 8, 8) with values 0..16 and their labels, as scikit-learn ships them.

    Read straight from the CSV inside the installed scikit-learn (what ``load_digits`` reads),
    without importing scikit-learn: that import costs over a second in every fresh process
    (each SuperNode message runs in one). Falls back to ``load_digits`` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_sklearn_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as (N, 1, S, S) floats in [0, 1] and int64 labels."""
    pixels, labels = sklearn_digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp(0.0, 1.0)
    return images, torch.tensor(labels, dtype=torch.int64)


def split_train_test(n: int, test_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A seeded random split of range(n) into train and test indices (both non-empty)."""
    order = torch.randperm(n, generator=gen)
    num_test = min(max(1, round(n * test_fraction)), n - 1)
    return order[num_test:], order[:num_test]


def build_digits_federation(dataset: DictConfig, seed: int) -> Federation:
    """The built-in feature-shift federation: ``clients_per_domain`` clients per domain."""
    domains = tuple(dataset.domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"dataset.domains: unknown {unknown}; valid domains: {list(DOMAINS)}")
    images, labels = load_sklearn_digits(int(dataset.image_size))
    num_clients = len(domains) * int(dataset.clients_per_domain)
    if num_clients * 2 > len(labels):
        raise ValueError(f"{num_clients} clients need at least 2 of the {len(labels)} images each")
    gen = torch.Generator().manual_seed(seed)
    shares = torch.randperm(len(labels), generator=gen).tensor_split(num_clients)
    clients = []
    for cid, share in enumerate(shares):
        domain = cid // int(dataset.clients_per_domain)
        x = normalize(render_domain(images[share], domains[domain], gen))
        train, test = split_train_test(len(share), float(dataset.test_fraction), gen)
        clients.append(ClientData(x[train], labels[share][train], x[test], labels[share][test],
                                  domain, domains[domain]))
    size = int(dataset.image_size)
    return Federation(clients, 10, (3, size, size), domains)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] pixels to [-1, 1] (mean 0.5, std 0.5 per channel, as FedBN's digits code)."""
    return (images - 0.5) / 0.5
