"""lm_eval: zero-shot task accuracy through EleutherAI's lm-evaluation-harness.

Yu et al. judge a super weight by what it costs on downstream tasks (ARC, HellaSwag, PIQA,
LAMBADA, ...). The harness scores the in-memory model as it is, perturbed in place, through
its own HFLM wrapper: the same loglikelihood comparison the harness reports everywhere,
never re-implemented here, and no reload between conditions. The harness is an optional
extra (`pip install esa-toolkit[tasks]`), imported only when this evaluator is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from esa_core.api import DIFFERENCE, PER_ITEM, EvalData, Evaluator, Measure, Option
from esa_core.errors import EsaError, closest

METRIC = "acc"  # the harness's accuracy: the highest-loglikelihood choice is the right one
EXTRA = "pip install 'esa-toolkit[tasks]'"
log = logging.getLogger(__name__)


def task_name(spec: str) -> str:
    """A task's name: as given, or the `task:` key of a local task's YAML file."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise EsaError(f"lm_eval task file not found: {spec}.")
        found = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", path.read_text(encoding="utf-8"),
                          re.MULTILINE)
        if found is None:
            raise EsaError(f"lm_eval task file {spec} has no `task:` name.")
        return found.group(1)
    return spec


class LmEval(Evaluator):
    """Zero-shot accuracy on lm-evaluation-harness tasks (--eval-task; needs [tasks] extra)."""

    name = "lm_eval"
    options = (
        Option("tasks", str, "", "comma-separated harness tasks or local task YAML files "
               "(--eval-task)"),
        Option("limit", int, 0, "at most N items per task, 0 for all (--eval-limit)"),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.specs = [t.strip() for t in self.settings["tasks"].split(",") if t.strip()]
        if not self.specs:
            raise EsaError("the lm_eval evaluator needs tasks: --eval-task arc_easy,hellaswag "
                           "(or a local task's YAML file).")
        if importlib.util.find_spec("lm_eval") is None:
            raise EsaError(f"the lm_eval evaluator needs lm-evaluation-harness: {EXTRA}.")
        self.names = [task_name(spec) for spec in self.specs]
        self._tasks: dict[str, Any] | None = None
        self._manager: Any = None

    def task_manager(self) -> Any:
        """The harness's index of its task files (built once: it reads no task data)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            if not logging.getLogger("esa_core").isEnabledFor(logging.INFO):  # unless --verbose
                logging.getLogger("lm_eval").setLevel(logging.ERROR)
            self._manager = TaskManager()
        return self._manager

    def known_tasks(self) -> set[str]:
        """Every name the harness can load (tasks, groups, tags). Its index parses ~14,000
        YAML files (33 s on 2 busy cores), so it is built once per harness version and kept
        in ESA's cache; a refused run then takes a second."""
        from esa_core.api import cache_dir

        path = cache_dir() / f"lm_eval-{importlib.metadata.version('lm_eval')}-tasks.json"
        try:
            return set(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        names = sorted(self.task_manager().all_tasks)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(names), encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:  # a read-only cache costs time, not the run
            log.info("could not cache lm_eval's task index in %s: %s", path, exc)
        return set(names)

    def check(self) -> None:
        """Every named task is one the harness knows (offline: its index, not its data)."""
        named = [spec for spec in self.specs if Path(spec).suffix not in (".yaml", ".yml")]
        if not named:
            return
        known = self.known_tasks()
        for spec in named:
            if spec not in known:
                hint = closest(spec, known)
                raise EsaError(f"lm_eval knows no task '{spec}'"
                               f"{f' (did you mean {hint!r}?)' if hint else ''}; "
                               "see `lm-eval ls tasks`.")

    def measures(self) -> tuple[Measure, ...]:
        return tuple(
            Measure(f"{name}_acc", f"{name}_acc_drop", higher_is_better=True, change=DIFFERENCE,
                    help=f"{name} zero-shot accuracy, baseline - perturbed")
            for name in self.names)

    def prepare(self, model: nn.Module, data: EvalData) -> None:
        """Load every task's data once (from the cache when offline), and check it has `acc`."""
        manager = self.task_manager()
        tasks: dict[str, Any] = {}
        for spec, name in zip(self.specs, self.names):
            try:
                loaded = manager.load([spec])
            except KeyError:
                raise EsaError(f"lm_eval knows no task '{spec}' (see `lm-eval ls tasks`).") \
                    from None
            except Exception as exc:  # the datasets library: no network and nothing cached
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise EsaError(f"lm_eval could not load the data of task '{spec}' (offline "
                               f"without its cached data?): {type(exc).__name__}: {cause}") \
                    from None
            if name not in loaded["tasks"]:
                raise EsaError(f"lm_eval task '{spec}' is a group or tag, not one task: name "
                               f"its tasks ({', '.join(sorted(loaded['tasks']))}).")
            task = loaded["tasks"][name]
            if METRIC not in task.aggregation():
                raise EsaError(f"lm_eval task '{name}' reports no accuracy ({METRIC}); ESA "
                               "measures tasks by their multiple-choice accuracy.")
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)  # zero-shot, as Yu et al.
            tasks[name] = task
        self._tasks = {"tasks": tasks, "groups": {}, "group_map": {}}

    def evaluate(self, model: nn.Module, data: EvalData, label: str = "") -> dict[str, Any]:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._tasks is None:
            self.prepare(model, data)
        # HFLM wraps the live model: a perturbation made in place is what the harness scores
        lm = HFLM(pretrained=model, tokenizer=data.tokenizer, batch_size=data.batch_size)
        out = evaluate(lm=lm, task_dict=self._tasks, limit=self.settings["limit"] or None,
                       bootstrap_iters=0, log_samples=True)
        results = out["results"]
        values: dict[str, Any] = {
            f"{name}_acc": float(results[name][f"{METRIC},none"]) for name in self.names}
        values["items"] = {name: int(out["n-samples"][name]["effective"])
                           for name in self.names}
        values[PER_ITEM] = {f"{name}_acc": item_correctness(out["samples"][name])
                            for name in self.names}
        return values


def item_correctness(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each item's correctness in document order (so baseline and perturbed pair up)."""
    scored = sorted((s["doc_id"], float(s[METRIC])) for s in samples
                    if s.get("filter", "none") == "none")
    return {"sum": [acc for _, acc in scored], "count": [1.0] * len(scored)}
