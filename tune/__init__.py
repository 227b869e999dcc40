"""Ray Tune searches and ablations over daae's loss weights, ranked on
validation accuracy subject to the decorrelation target (adversary and probe
accuracy near chance). Every trial runs the very same ``daae.train.train``.

Importing this package does not import Ray; ``tune.runner`` does.
"""
from .objective import Objective, Target
from .space import Distribution, SearchError
from .spec import SearchSpec, load_search, parse_search

__all__ = ["Distribution", "Objective", "SearchError", "SearchSpec", "Target", "load_search",
           "parse_search", "run_search", "resume_search"]


def run_search(spec, **kwargs):
    from .runner import run_search as _run

    return _run(spec, **kwargs)


def resume_search(path, **kwargs):
    from .runner import resume_search as _resume

    return _resume(path, **kwargs)
