"""Registry of training methods: ``get_algorithm(config.algorithm.name)``."""

from ssl_jax.algorithms.base import Algorithm
from ssl_jax.algorithms.comatch import COMATCH, COMATCH_CCSSL, COMATCH_TRIPLET
from ssl_jax.algorithms.fixmatch import FIXMATCH, FIXMATCH_CCSSL
from ssl_jax.algorithms.supervised import SUPERVISED

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (SUPERVISED, FIXMATCH, FIXMATCH_CCSSL, COMATCH, COMATCH_CCSSL, COMATCH_TRIPLET)
}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name`; an unknown name lists the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"Unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm"]
