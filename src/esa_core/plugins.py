"""Discover plugins from the `esa` entry-point group and index what they register.

Built-ins and third-party plugins take the same path: an entry point, a pluggy hook call.
A plugin that fails to import is reported (a warning and a row in `esa list-plugins`), never fatal.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from dataclasses import dataclass, field

import pluggy

from esa_core import hookspecs
from esa_core.api import ACTIVATIONS, GRAD, HVP, Evaluator, Metric, ModelAdapter, Perturbation
from esa_core.errors import EsaError, unknown_choice

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "esa"
KINDS = {
    "metric": "register_metrics",
    "perturbation": "register_perturbations",
    "model adapter": "register_model_adapters",
    "evaluator": "register_evaluators",
}
BASES = {"metric": Metric, "perturbation": Perturbation, "model adapter": ModelAdapter,
         "evaluator": Evaluator}
KNOWN_NEEDS = frozenset({GRAD, HVP, ACTIVATIONS})


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin object and where it came from."""

    kind: str
    name: str
    description: str
    distribution: str
    version: str
    cls: type | None = None
    error: str | None = None


@dataclass
class Registry:
    """Everything the installed plugins registered, by kind and name."""

    entries: list[PluginInfo] = field(default_factory=list)

    def of_kind(self, kind: str) -> dict[str, type]:
        return {e.name: e.cls for e in self.entries if e.kind == kind and e.cls is not None}

    def get(self, kind: str, name: str) -> type:
        """The class registered as `name`, or the one-line error naming the valid choices."""
        found = self.of_kind(kind)
        if name not in found:
            raise unknown_choice(kind, name, found)
        return found[name]

    @property
    def metrics(self) -> dict[str, type]:
        return self.of_kind("metric")

    @property
    def model_adapters(self) -> dict[str, type]:
        return self.of_kind("model adapter")

    def adapter_for(self, model_type: str, requested: str | None = None) -> type:
        """The adapter named by --adapter, else the one claiming `model_type`, else the
        fallback (an adapter declaring `fallback = True`, e.g. the generic one)."""
        if requested:
            return self.get("model adapter", requested)
        adapters = self.model_adapters
        for cls in adapters.values():
            if model_type in cls.model_types:
                return cls
        fallbacks = sorted(name for name, cls in adapters.items() if cls.fallback)
        if not fallbacks:
            raise EsaError(f"no model adapter claims model_type '{model_type}' and none is "
                           "installed as the fallback: pass --adapter (see `esa list-plugins`).")
        return adapters[fallbacks[0]]

    def remover(self) -> type:
        """The perturbation that removes a weight (declares `removes = True`): --ablate-top's
        rule."""
        found = sorted(name for name, cls in self.of_kind("perturbation").items()
                       if cls.removes)
        if not found:
            raise EsaError("--ablate-top needs a perturbation that removes a weight (one that "
                           "declares `removes = True`), and none is installed.")
        return self.get("perturbation", found[0])


def check_plugin_class(kind: str, cls: type) -> None:
    """Refuse at registration what would fail or be ignored later, with one line saying why."""
    base = BASES[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise EsaError(f"{cls!r} is registered as kind '{kind}' but is not a subclass of "
                       f"esa_core.api.{base.__name__}.")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise EsaError(f"{kind} {cls.__name__} has no `name`.")
    needs = getattr(cls, "needs", frozenset())
    unknown = sorted(set(needs) - KNOWN_NEEDS)
    if unknown:
        raise EsaError(f"{kind} '{cls.name}' needs unknown '{unknown[0]}'; known: "
                       f"{', '.join(sorted(KNOWN_NEEDS))}.")
    if GRAD in needs and HVP in needs:
        raise EsaError(f"{kind} '{cls.name}' needs both grad and hvp: one backward pass serves "
                       "one of them, so on_grad would never run. Split it into two metrics.")


def _first_doc_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def load_registry() -> Registry:
    """Load every `esa` entry point, call its hooks, and index the result."""
    pm = pluggy.PluginManager("esa")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    origin: dict[str, tuple[str, str]] = {}
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        plugin_name = f"{dist}:{ep.name}"
        if pm.has_plugin(plugin_name):
            continue  # the same distribution seen twice on sys.path
        try:
            module = ep.load()
            pm.register(module, name=plugin_name)
        except Exception as exc:  # a broken plugin must not break the CLI
            log.warning("plugin %s (%s %s) failed to load: %s", ep.name, dist, version, exc)
            registry.entries.append(
                PluginInfo("broken plugin", ep.name, str(exc), dist, version, error=repr(exc))
            )
            continue
        origin[plugin_name] = (dist, version)

    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist, version = origin[impl.plugin_name]

            def register(cls: type, kind: str = kind, dist: str = dist, version: str = version):
                try:
                    check_plugin_class(kind, cls)
                except EsaError as exc:  # refused alone: the plugin's other classes still count
                    log.warning("plugin %s (%s %s) refused: %s", getattr(cls, "__name__", cls),
                                dist, version, exc)
                    registry.entries.append(PluginInfo(
                        "broken plugin", getattr(cls, "__name__", repr(cls)), str(exc), dist,
                        version, error=str(exc)))
                    return
                registry.entries.append(
                    PluginInfo(kind, cls.name, _first_doc_line(cls), dist, version, cls)
                )

            try:
                impl.function(register=register)
            except Exception as exc:
                log.warning("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc)
                registry.entries.append(
                    PluginInfo("broken plugin", impl.plugin_name, str(exc), dist, version,
                               error=repr(exc))
                )
    _warn_duplicates(registry)
    return registry


def _warn_duplicates(registry: Registry) -> None:
    seen: dict[tuple[str, str], PluginInfo] = {}
    for e in registry.entries:
        if e.cls is None:
            continue
        key = (e.kind, e.name)
        if key in seen:
            log.warning(
                "%s '%s' is registered by both %s and %s; the later one wins",
                e.kind, e.name, seen[key].distribution, e.distribution,
            )
        seen[key] = e


@functools.cache
def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    return load_registry()
