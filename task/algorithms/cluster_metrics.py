"""How well a clustering of clients matches their true clusters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def cluster_ari(assignment: Mapping[int, int], truth: Sequence[int],
                exclude: Iterable[int] = ()) -> float | None:
    """Adjusted Rand index of ``assignment`` (client -> cluster) against ``truth[client]``.

    Only assigned clients count, the ``exclude``d (Byzantine) ones left out; 1.0 is a perfect
    match up to renaming the clusters, about 0 a random one. None where fewer than two
    clients are assigned.
    """
    from sklearn.metrics import adjusted_rand_score  # here: the import costs a ClientApp ~1 s

    skip = set(exclude)
    clients = sorted(c for c in assignment if c not in skip and 0 <= c < len(truth))
    if len(clients) < 2:
        return None
    return float(adjusted_rand_score([truth[c] for c in clients], [assignment[c] for c in clients]))
