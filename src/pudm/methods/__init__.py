"""The registry of training methods: one module per method, one line per method here.

Everything that depends on the method (the loop, the tasks, the command line, the API, the
benchmark, the evaluator, the model cards) asks this registry; a new method is a module, its
tests and a line below, and the contract tests (``tests/test_method_contract.py``) run it.
"""

from __future__ import annotations

from collections.abc import Callable

from pudm.errors import UsageError
from pudm.methods.base import S_OBJECTIVES, ClassifierMethod, Method, TrainingItems
from pudm.methods.filter import Filter
from pudm.methods.oracle import Oracle
from pudm.methods.pu import PU
from pudm.methods.pu_bounded import PUBounded
from pudm.methods.reject import Reject
from pudm.methods.supervised import Supervised
from pudm.methods.unsupervised import Unsupervised
from pudm.methods.weighted import Weighted

REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        Unsupervised(),
        Supervised(),
        PU(),
        Filter(),
        Oracle(),
        PUBounded(),
        Weighted(),
        Reject(),
    )
}


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a :class:`UsageError` listing them."""
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(where: Callable[[Method], bool] | None = None) -> tuple[str, ...]:
    """The registered methods' names (those for which ``where(method)`` holds), in registry order."""
    return tuple(name for name, method in REGISTRY.items() if where is None or where(method))


__all__ = ["REGISTRY", "S_OBJECTIVES", "ClassifierMethod", "Method", "TrainingItems", "get", "names"]
