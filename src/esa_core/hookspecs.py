"""The hooks a plugin implements. Each receives a `register` callable and calls it with classes.

A plugin is any module listed under the `esa` entry-point group of an installed distribution::

    [project.entry-points.esa]
    my_metrics = "my_package.plugin"

and in that module::

    from esa_core import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)

The built-in metrics, perturbations, model adapters and evaluators are registered this way too.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("esa")
hookimpl = pluggy.HookimplMarker("esa")


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register sensitivity metrics.

    Called once per process, when ESA first needs its plugin registry (a run, `esa
    list-plugins`), after every `esa` entry point has been imported.

    :param register: call `register(cls)` with each class, a subclass of
        `esa_core.api.Metric` with a unique `name`; a class that is not, or that declares
        unknown `needs` (or both grad and hvp), is refused and listed as a broken plugin.
    :return: nothing; what counts is the classes passed to `register`.
    """


@hookspec
def register_perturbations(register: Callable[[type], None]) -> None:
    """Register perturbations (the rules `--perturb` chooses from).

    Called once per process, with the other registration hooks.

    :param register: call `register(cls)` with each subclass of `esa_core.api.Perturbation`;
        its `options` are set with `--perturb-arg key=value`.
    :return: nothing.
    """


@hookspec
def register_model_adapters(register: Callable[[type], None]) -> None:
    """Register model adapters, which map a model family's parameters to components.

    Called once per process, with the other registration hooks. A run picks the adapter whose
    `model_types` holds the model's `config.model_type`, or the one named by `--adapter`.

    :param register: call `register(cls)` with each subclass of `esa_core.api.ModelAdapter`.
    :return: nothing.
    """


@hookspec
def register_evaluators(register: Callable[[type], None]) -> None:
    """Register evaluators, which measure the model before and under each perturbation.

    Called once per process, with the other registration hooks. `--evaluator` picks them.

    :param register: call `register(cls)` with each subclass of `esa_core.api.Evaluator`.
    :return: nothing.
    """
