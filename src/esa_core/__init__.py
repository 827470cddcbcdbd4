"""ESA: find the few weights of a large language model that matter most, and prove it."""

from importlib.metadata import version

from esa_core.hookspecs import hookimpl

__version__ = version("esa-toolkit")  # written once, in pyproject.toml
__all__ = ["__version__", "hookimpl", "run", "RunConfig"]


def __getattr__(name: str):
    # `esa_core.run(...)` and `esa_core.RunConfig` without importing torch on `import esa_core`
    if name == "RunConfig":
        from esa_core.config import RunConfig

        return RunConfig
    if name == "run":
        from esa_core.pipeline import run

        return run
    raise AttributeError(name)
