"""The hooks a plugin implements. Each receives a `register` callable and calls it with classes.

A plugin is any module listed under the `esa` entry-point group of an installed distribution::

    [project.entry-points.esa]
    my_metrics = "my_package.plugin"

and in that module::

    from esa_core import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)

The built-in metrics, perturbations and model adapters are registered this way too.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("esa")
hookimpl = pluggy.HookimplMarker("esa")


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register sensitivity metrics: `register(cls)` for each subclass of `esa_core.api.Metric`.

    Called once, when ESA first needs the plugin registry.
    """


@hookspec
def register_perturbations(register: Callable[[type], None]) -> None:
    """Register perturbations: `register(cls)` for each subclass of `esa_core.api.Perturbation`."""


@hookspec
def register_model_adapters(register: Callable[[type], None]) -> None:
    """Register model adapters: `register(cls)` for each subclass of `esa_core.api.ModelAdapter`."""


@hookspec
def register_evaluators(register: Callable[[type], None]) -> None:
    """Register evaluators: `register(cls)` for each subclass of `esa_core.api.Evaluator`."""
