"""Low-rank and sparse building blocks of FedSLR: pure functions on tensors.

- ``svt(M, tau)``: singular value thresholding, the proximal operator of tau ||M||_*:
  argmin_X (1/2)||X - M||_F^2 + tau ||X||_*  =  U diag(max(s - tau, 0)) V^T.
- ``soft_threshold(x, tau)``: the proximal operator of tau ||x||_1: sign(x) max(|x| - tau, 0).
- ``to_matrix`` / ``from_matrix``: a conv weight [out, in, kh, kw] is swapped to
  [out, kh, in, kw] and reshaped to [out*kh, in*kw] for the SVD (as the authors' code does), and back.
- ``svt_factors`` / ``rebuild``: the thresholded layer as the factors A = U_r sqrt(S_r) and
  B = sqrt(S_r) V_r^T, and the layer rebuilt from them (the same function on server and client).
- ``encode_transport`` / ``decode_transport``: a state dict whose low-rank layers travel as
  ``<key>@U`` and ``<key>@V`` where the factors are smaller than the dense layer.
- ``feddyn_correction`` / ``dual_update``: FedDyn's server correction h and client dual mu.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]
FACTOR_U = "@U"
FACTOR_V = "@V"


# --- proximal operators ------------------------------------------------------------------
def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """sign(x) * max(|x| - tau, 0): the prox of tau * ||x||_1 (exact zeros where |x| <= tau)."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def svt(matrix: torch.Tensor, tau: float) -> torch.Tensor:
    """U diag(max(s - tau, 0)) V^T: the prox of tau * ||.||_* (nuclear norm) at ``matrix``."""
    a, b = svt_factors(matrix, tau)
    return rebuild(a, b)


def svt_factors(matrix: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A = U_r sqrt(S_r) [m, r], B = sqrt(S_r) V_r^T [r, n], S_r = s - tau > 0.

    r, the number of singular values above ``tau``, is the rank of the thresholded matrix A @ B.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    shrunk = torch.clamp(s - tau, min=0.0)
    keep = shrunk > 0
    root = shrunk[keep].sqrt()
    return (u[:, keep] * root).contiguous(), (root[:, None] * vh[keep]).contiguous()


def rebuild(a: torch.Tensor, b: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A @ B (reshaped back to ``shape`` with ``from_matrix`` if given).

    The product is taken in float64 on the CPU and rounded once to the factors' dtype, so that
    the server and every client (whatever their BLAS thread count) get the same weights.
    """
    product = (a.detach().cpu().double() @ b.detach().cpu().double()).to(a.dtype)
    return product if shape is None else from_matrix(product, shape)


def rank(a: torch.Tensor) -> int:
    """Rank of a layer given by its factor A (its number of columns)."""
    return int(a.shape[1])


# --- conv reshape ------------------------------------------------------------------------
def to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A >= 2-D weight as the matrix its SVD is taken of.

    2-D: as is. 4-D conv [out, in, kh, kw]: swap(1, 2) -> [out, kh, in, kw] -> [out*kh, in*kw]
    (the authors' reshape: rows mix output channels with kernel rows, columns input channels
    with kernel columns). Other ranks: [shape[0], rest].
    """
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        out, cin, kh, kw = weight.shape
        return weight.transpose(1, 2).reshape(out * kh, cin * kw)
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``to_matrix`` for a weight of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return matrix.reshape(shape).contiguous()
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return matrix.reshape(out, kh, cin, kw).transpose(1, 2).contiguous()
    return matrix.reshape(shape).contiguous()


def full_rank(shape: Sequence[int]) -> int:
    """The largest rank a weight of ``shape`` can have in its ``to_matrix`` form."""
    rows, cols = to_matrix(torch.empty(tuple(shape), device="meta")).shape
    return int(min(rows, cols))


# --- factorised transport ----------------------------------------------------------------
def factors_are_smaller(a: torch.Tensor, b: torch.Tensor, dense: torch.Tensor) -> bool:
    """Whether sending A and B costs fewer numbers than the dense layer (r (m + n) < m n)."""
    return a.numel() + b.numel() < dense.numel()


def encode_transport(state: Mapping[str, torch.Tensor],
                     factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> StateDict:
    """``state`` with every layer in ``factors`` replaced by ``<key>@U``, ``<key>@V`` where smaller.

    ``state[key]`` must equal ``rebuild(*factors[key], shape)``: the receiver gets that exactly.
    """
    out: StateDict = {}
    for key, value in state.items():
        pair = factors.get(key)
        if pair is not None and factors_are_smaller(pair[0], pair[1], value):
            out[key + FACTOR_U], out[key + FACTOR_V] = pair
        else:
            out[key] = value
    return out


def decode_transport(received: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]
                     ) -> StateDict:
    """The dense state dict from a transport: factor pairs rebuilt to their layer's shape.

    ``shapes`` holds every layer's dense shape (the receiver's own model). A factor without
    its partner, or a key the model does not have, raises ``KeyError``.
    """
    out: StateDict = {}
    for key, value in received.items():
        if key.endswith(FACTOR_V):
            continue
        if key.endswith(FACTOR_U):
            layer = key[: -len(FACTOR_U)]
            partner = received.get(layer + FACTOR_V)
            if partner is None or layer not in shapes:
                raise KeyError(f"factor {key!r} has no partner {layer + FACTOR_V!r} or no layer")
            out[layer] = rebuild(value, partner, shapes[layer]).to(value.device)
        else:
            out[key] = value
    stray = [k for k in received if k.endswith(FACTOR_V) and k[: -len(FACTOR_V)] not in out]
    if stray:
        raise KeyError(f"factors without their U partner: {stray[:3]}")
    return out


def transport_spec(state: Mapping[str, torch.Tensor],
                   factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, tuple[int, ...]]:
    """Keys and shapes ``encode_transport`` produces (for checks and byte counts)."""
    return {k: tuple(v.shape) for k, v in encode_transport(state, factors).items()}


# --- FedDyn ------------------------------------------------------------------------------
def feddyn_correction(h: Mapping[str, torch.Tensor], uploads: Sequence[Mapping[str, torch.Tensor]],
                      w_s: Mapping[str, torch.Tensor], alpha: float, num_clients: int) -> StateDict:
    """h - alpha (1/N) sum_{i in S} (w_i - w_s), over h's keys (N: all clients, not the sampled)."""
    out: StateDict = {}
    for key, value in h.items():
        drift = torch.zeros_like(value, dtype=torch.float64)
        for w_i in uploads:
            drift += w_i[key].double() - w_s[key].double()
        out[key] = (value.double() - alpha / num_clients * drift).to(value.dtype)
    return out


def feddyn_aggregate(mean: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor],
                     alpha: float) -> StateDict:
    """W~ = mean_S(w_i) - (1/alpha) h on h's keys; the other entries of ``mean`` as they are."""
    return {k: (v - h[k] / alpha) if k in h else v for k, v in mean.items()}


def dual_update(mu: Mapping[str, torch.Tensor], w_s: Mapping[str, torch.Tensor],
                w_i: Mapping[str, torch.Tensor], alpha: float) -> StateDict:
    """mu_i <- mu_i + alpha (w_s - w_i): the client's FedDyn dual after its local training."""
    return {k: v + alpha * (w_s[k] - w_i[k]) for k, v in mu.items()}


def sparsity(tensors: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over all entries of ``tensors``."""
    zeros, total = 0, 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / max(total, 1)
