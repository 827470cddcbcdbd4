"""ESA's built-in evaluators, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_evaluators.lm_eval import LmEval
from esa_evaluators.perplexity import Perplexity


@hookimpl
def register_evaluators(register):
    for cls in (Perplexity, LmEval):
        register(cls)
