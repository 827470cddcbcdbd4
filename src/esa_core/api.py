"""The contracts a plugin implements: Metric, Perturbation, ModelAdapter, Evaluator.

The engine owns forward, backward, hooks, accumulation, selection and restoring weights.
A metric is only its formula, a perturbation only its rule, an adapter only its family's layout.
Everything a plugin author needs to know is in the docstrings below.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from esa_core.errors import EsaError, PluginFailure, unknown_choice
from esa_core.layout import COMPONENTS

NOT_SCORED_BY_DEFAULT = ("embed", "lm_head")


def cache_dir() -> Path:
    """Where a plugin may keep what it computes once per installation (ESA's cache folder:
    $ESA_CACHE_DIR, else $XDG_CACHE_HOME/esa, else ~/.cache/esa)."""
    from esa_core.loading import cache_dir as esa_cache

    return esa_cache()


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One plugin option, set with `--metric-arg name=value` (`--perturb-arg`, `--eval-arg`)."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    bounds: tuple[float, float] | None = None  # inclusive range of a numeric option

    def parse(self, owner: str, raw: Any) -> Any:
        try:
            value = self.type(raw)
        except (TypeError, ValueError):
            raise EsaError(
                f"{owner} option '{self.name}' needs a {self.type.__name__}, got '{raw}'."
            ) from None
        if self.choices is not None and value not in self.choices:
            choices = ", ".join(map(str, self.choices))
            raise EsaError(f"{owner} option '{self.name}' must be one of: {choices}.")
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            low, high = self.bounds
            raise EsaError(f"{owner} option '{self.name}' must lie in [{low:g}, {high:g}]; "
                           f"got {value}.")
        return value


class Configurable:
    """A plugin with a name, a one-line description (its docstring's first line) and options."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **values: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise EsaError(
                f"{self.name} has no option '{unknown[0]}'. Valid options: {valid}."
            )
        self.settings: dict[str, Any] = {
            name: opt.parse(self.name, values[name]) if name in values else opt.default
            for name, opt in known.items()
        }


# --------------------------------------------------------------------------- metrics

GRAD = "grad"
HVP = "hvp"
ACTIVATIONS = "activations"


class Metric(Configurable):
    """A sensitivity metric: how one calibration batch adds to each weight's score.

    Declare in `needs` what the engine must produce for each batch:

    - `GRAD`: dL/dW of the batch loss (mean next-token cross-entropy); `on_grad` runs as each
      parameter's gradient is accumulated, after which the engine frees that gradient.
    - `HVP`: Hessian-vector products H·z for Rademacher probes z (double backward); `on_hvp`
      runs once per probe with the matching slices of z and H·z.
    - `ACTIVATIONS`: the matrix's inputs X [tokens, in] and outputs Y [tokens, out]
      (for an MoE expert only the tokens routed to it) and each token's position in its block;
      `on_activations` runs per forward.
    - nothing: a data-free metric; only `finalize` runs.

    `components` (canonical names or globs) narrows the weights scored when the user gives no
    --include, for a metric defined only on some matrices (e.g. down-projections); None scores
    the adapter's default set.

    Every callback sees one 2-D weight matrix (an MoE expert's slice of a 3-D tensor is passed as
    its own matrix) and the state `init_state` made for it. Keep the state small: at most one
    accumulator of the weight's shape, never a copy of the gradient.

    A metric may report more than scores: `keep` names what of a seed's state outlives it, and
    `findings` turns that, for every seed, into tables the core stores, renders and prints.
    The engine keeps it per seed with the seed's resume unit; a metric keeps no memory of its
    own across seeds.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    #: How states from several ranks (torchrun) combine before `finalize`: "sum" for states that
    #: add up over batches (the default), "max" or "min" for running extremes. Every tensor in
    #: the state is reduced this way, so a state is a tensor or a tuple/list/dict of tensors;
    #: a `RunningMax` in it keeps each channel's largest value with that value's own position.
    state_reduce: ClassVar[str] = "sum"
    #: default scope when the user gives no --include; None: the adapter's default set.
    components: ClassVar[tuple[str, ...] | None] = None
    #: Hessian-vector probes per batch (HVP metrics only).
    probes: int = 1

    def init_state(self, weight: torch.Tensor, dtype: torch.dtype) -> Any:
        """A fresh accumulator for one matrix; by default zeros of the weight's shape."""
        return torch.zeros(weight.shape, dtype=dtype, device=weight.device)

    def on_grad(self, state: Any, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one batch's gradient contribution to `state` in place."""
        raise NotImplementedError

    def on_hvp(self, state: Any, weight: torch.Tensor, hz: torch.Tensor, z: torch.Tensor) -> None:
        """Add one probe's contribution (H·z and z, weight-shaped) to `state` in place."""
        raise NotImplementedError

    def on_activations(self, state: Any, weight: torch.Tensor, inputs: torch.Tensor,
                       outputs: torch.Tensor, positions: torch.Tensor) -> None:
        """Add one forward's activations (inputs [tokens, in], outputs [tokens, out]).

        `positions[t]` (int64) is the position of token row t within its calibration block: for
        an MoE expert, the position of each routed token, not its count among them.
        """
        raise NotImplementedError

    def finalize(self, state: Any, weight: torch.Tensor, num_batches: int) -> torch.Tensor:
        """The score of every weight of the matrix (weight-shaped, higher = more sensitive)."""
        return state / max(num_batches, 1)

    def keep(self, state: Any, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `findings` needs of one matrix's state after every seed scored (called before
        `finalize`, on the state reduced across ranks).

        Small tensors only (a value per channel, never weight-sized): the engine moves them to
        the host and saves them with the seed's resume unit, so a resumed run has every seed's.
        The default keeps nothing.
        """
        return {}

    def findings(self, kept: list[Kept]) -> list[Findings]:
        """Tables of results beyond the scores, from what `keep` kept of every matrix and seed.

        The core stores them in sensitivity_stats.json (`findings`), renders them in the
        report and prints their marked rows; it never needs to know the metric. Default: none.
        """
        return []


@dataclass
class RunningMax:
    """Per-channel running maxima and where each was reached (e.g. a token's position).

    A metric state may hold these. Across ranks (torchrun) and seeds each channel keeps the
    largest value together with its own position, never the largest position.
    """

    values: torch.Tensor
    at: torch.Tensor  # int64, same shape as `values`

    @classmethod
    def zeros(cls, n: int, dtype: torch.dtype, device: torch.device) -> RunningMax:
        return cls(torch.zeros(n, dtype=dtype, device=device),
                   torch.zeros(n, dtype=torch.int64, device=device))

    def update(self, values: torch.Tensor, at: torch.Tensor) -> None:
        """Take `values` (and their `at`) where they exceed the running maxima (ties keep the
        earlier)."""
        values = values.to(self.values.device, self.values.dtype)
        self.at.copy_(torch.where(values > self.values, at.to(self.at.device), self.at))
        torch.maximum(self.values, values, out=self.values)

    @classmethod
    def merged(cls, parts: Sequence[RunningMax]) -> RunningMax:
        """One RunningMax over `parts` (e.g. every seed's), the first part winning ties."""
        total = cls(parts[0].values.clone(), parts[0].at.clone())
        for part in parts[1:]:
            total.update(part.values, part.at)
        return total


@dataclass(frozen=True)
class Column:
    """One declared column of a findings table."""

    name: str
    help: str = ""


@dataclass
class Findings:
    """A table a metric reports beyond its scores (e.g. a detection rule applied per matrix).

    Every row holds exactly the declared `columns`, each a JSON scalar. `mark` names a boolean
    column: the rows where it holds are the news (counted and printed on the terminal); None
    prints every row. `note` says how to read the table (its rule), `facts` hold settings
    worth keeping beside it (a threshold).
    """

    name: str  # key in sensitivity_stats.json -> findings
    title: str
    columns: tuple[Column, ...]
    rows: list[dict[str, Any]]
    note: str = ""
    mark: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def stored(self, owner: str) -> dict[str, Any]:
        """The table as sensitivity_stats.json holds it; PluginFailure (naming `owner`, the
        metric) for a row that does not hold exactly the declared columns."""
        names = [c.name for c in self.columns]
        if self.mark is not None and self.mark not in names:
            raise PluginFailure(f"metric '{owner}': findings '{self.name}' marks rows by "
                                f"'{self.mark}', which is not one of its columns.")
        for row in self.rows:
            if set(row) != set(names) or not all(
                    v is None or isinstance(v, (bool, int, float, str)) for v in row.values()):
                raise PluginFailure(
                    f"metric '{owner}': a row of findings '{self.name}' holds {list(row)}, not "
                    f"the declared columns {names} with one number, string or null each.")
        return {"title": self.title, "note": self.note,
                "columns": [{"name": c.name, "help": c.help} for c in self.columns],
                "mark": self.mark, "facts": self.facts,
                "rows": [{name: row[name] for name in names} for row in self.rows]}


@dataclass
class Kept:
    """What `Metric.keep` kept of one matrix (`param`, or `param[expert]`), per seed in order."""

    param: str
    expert: int | None
    matrices: list[LogicalMatrix]  # its logical matrices (several for a fused tensor)
    seeds: list[dict[str, torch.Tensor]]

    def matrix_at(self, row: int) -> LogicalMatrix | None:
        """The scored logical matrix holding parameter row `row` (None: a part not scored)."""
        for m in self.matrices:
            if m.rows is None or bool((m.rows == row).any()):
                return m
        return None


# --------------------------------------------------------------------------- perturbations


class Perturbation(Configurable):
    """A rule that changes weights in place, reproducibly from a seed.

    Two uses, one method each. `--perturb`: the engine gathers the selected coordinates of one
    matrix, calls `perturb` with their current values, writes the result back, evaluates, and
    restores the saved originals bit-exactly. `--protect`: the engine calls `perturb_matrix`
    on every scored matrix with a mask of weights to keep (none, the top-k or a control set),
    evaluates the whole changed model, and restores it bit-exactly. A rule implements
    `perturb` (and gets `perturb_matrix` for free), or only `perturb_matrix` for a rule that is
    defined on whole matrices (a quantizer: `rtn`).
    The docstring's first line is the help `esa list-plugins` shows: state the rule there.
    Its strength is an option (`options`, read from `self.settings`), set with
    `--perturb-arg name=value` or `--protect-arg name=value`; `--perturb-scale` and
    `--perturb-prob` set the options named `scale` and `prob`.
    """

    #: True for the rule that removes a weight (sets it to what "absent" means, zero):
    #: `--ablate-top` ablates each candidate with it.
    removes: ClassVar[bool] = False

    def perturb(
        self, values: torch.Tensor, matrix: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """New values for `values` (same shape and dtype) and facts worth recording.

        `values` are the selected weights of one logical matrix (1-D, in the dtype the model
        was loaded in, on its device). `matrix` is that whole matrix, e.g. for its standard
        deviation: read it, never write it (the engine checksums the touched parameters).
        `generator` is a CPU generator seeded from the run's seed: draw on it and move the
        draws to `values.device`, so a seed perturbs the same way on any device. `facts` maps
        names to counts (e.g. bits flipped); the engine sums them over a condition's matrices.
        """
        raise NotImplementedError

    def perturb_matrix(
        self, matrix: torch.Tensor, keep: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A whole matrix's new values, the weights where `keep` is True unchanged, and facts.

        `matrix` is one logical matrix (2-D, the model's dtype, on its device): read it, never
        write it, and return a new tensor of its shape and dtype. `keep` is a bool tensor of the
        same shape; a kept weight must come back bit-identical (the engine checks) and should
        take no part in what the rule derives from the matrix (a quantizer's group range). The
        engine holds one matrix's original values beside the model at a time: keep temporaries
        to a few of the matrix's size. `generator` and `facts` are as in `perturb`.
        The default applies `perturb` to the weights not kept.
        """
        free = ~keep
        new, facts = self.perturb(matrix[free], matrix, generator)
        out = matrix.clone()
        out[free] = new
        return out, facts

    @classmethod
    def perturbs_selected(cls) -> bool:
        """Whether the rule can change selected weights alone (`perturb`), as --perturb needs."""
        return cls.perturb is not Perturbation.perturb


# --------------------------------------------------------------------------- evaluators

RELATIVE = "relative"  # change = value / baseline - 1 (perplexity: x2 is +1.0)
DIFFERENCE = "difference"  # change = baseline - value (a score 0.62 -> 0.40 is 0.22)
ITEM_MEAN = "mean"  # the value is sum(item sums) / sum(item counts): an accuracy
ITEM_EXP_MEAN = "exp_mean"  # the value is exp of that mean: a perplexity (exp of mean NLL)
#: evaluate's optional key: {measure name: {"sum": [one float per item], "count": [...]}}
PER_ITEM = "per_item"


@dataclass(frozen=True)
class Measure:
    """One number an evaluator reports, and how a perturbation's effect on it is expressed.

    `name` is the value's key (e.g. `loss`); `change_name` the key of its change against the
    unperturbed baseline (e.g. `loss_change`). `higher_is_better` orients the change so that damage
    is always positive: a relative change of a higher-is-better value is 1 - value / baseline,
    a difference of a lower-is-better value is value - baseline. `from_items` says how the value
    follows from per-item values, when the evaluator returns them (see `Evaluator`).
    """

    name: str
    change_name: str
    higher_is_better: bool
    change: str = RELATIVE
    help: str = ""
    from_items: str = ITEM_MEAN

    def damage(self, value: Any, baseline: Any) -> Any:
        """The change from `baseline` to `value`, positive when the model got worse.
        Elementwise on numpy arrays too (the bootstrap's resampled values)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.change == RELATIVE:
                delta = np.where(np.equal(baseline, 0), np.nan,
                                 np.divide(value, baseline) - 1.0)
            else:
                delta = np.subtract(value, baseline)
        delta = -delta if self.higher_is_better else delta
        return float(delta) if np.ndim(delta) == 0 else delta

    def value_from_items(self, sums: np.ndarray, counts: np.ndarray) -> Any:
        """The value over the items along the last axis (a resample of them, say)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mean = np.sum(sums, axis=-1) / np.sum(counts, axis=-1)
            return np.exp(mean) if self.from_items == ITEM_EXP_MEAN else mean


@dataclass
class EvalData:
    """What an evaluator may use: the run's held-out token blocks, its tokenizer, batch size."""

    blocks: torch.Tensor  # [n, seq_len] token ids, disjoint from every calibration block
    tokenizer: Any
    batch_size: int = 1


class Evaluator(Configurable):
    """Measures a model's behaviour: the baseline, then again under each perturbation.

    `measures()` declares what `evaluate` returns, the first being the primary measure that the
    success criteria judge by. `prepare` runs once before the baseline (load task data, check
    that what is needed exists, raising EsaError with one line if not). `evaluate` runs once per
    model state, on the model as it is (perturbed in place, in eval mode): it must not modify
    the model nor keep references to its tensors. It returns a flat dict holding a float for
    every declared measure's `name`; other JSON-able keys (token counts, `nonfinite_outputs`)
    are recorded beside them. A model whose outputs turned non-finite is a result: report
    inf/NaN values, never raise.

    Optionally, under the key `per_item` (PER_ITEM), a measure's value item by item: for each
    evaluation item (a held-out block, a task question) its `sum` and `count`, such that the
    value is `Measure.from_items` of sum(sums) / sum(counts) (perplexity: each block's summed
    NLL and token count). Every change then gets a paired bootstrap interval over the items;
    a measure without them gets none, and the report says so.
    """

    def measures(self) -> tuple[Measure, ...]:
        """The measures `evaluate` returns; may depend on the options (one per task, say)."""
        raise NotImplementedError

    def check(self) -> None:
        """Before the model loads: check what can be checked without it (task names, files),
        so that a mistake costs seconds, not a model load and a scoring pass. Raise EsaError."""

    def prepare(self, model: nn.Module, data: EvalData) -> None:
        """Once per run, before the baseline: load and check what evaluation needs."""

    def evaluate(self, model: nn.Module, data: EvalData, label: str = "") -> dict[str, Any]:
        """Every declared measure's value (and any extra facts) for the model as it is now."""
        raise NotImplementedError


# --------------------------------------------------------------------------- model adapters


@dataclass
class LogicalMatrix:
    """One logical weight matrix: a `per_layer` unit, a heatmap cell, a CSV `layer,component`.

    `rows` lists the real rows of the parameter (or of `param[expert]`) that belong to this
    matrix, for fused tensors such as Phi-3 `qkv_proj`; None means every row.
    """

    param: str
    layer: int | None
    component: str
    expert: int | None = None
    rows: torch.Tensor | None = None

    @property
    def key(self) -> str:
        """A readable unique name, e.g. `layers.3.attn.q` or `layers.1.moe.up.expert5`."""
        where = f"layers.{self.layer}." if self.layer is not None else ""
        expert = f".expert{self.expert}" if self.expert is not None else ""
        return f"{where}{self.component}{expert}"

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix's part of a parameter-shaped tensor (a copy when rows are picked)."""
        part = tensor[self.expert] if self.expert is not None else tensor
        return part if self.rows is None else part.index_select(0, self.rows.to(part.device))

    def assign(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` (shaped like `view(tensor)`) into this matrix's part of `tensor`."""
        part = tensor[self.expert] if self.expert is not None else tensor
        if self.rows is None:
            part.copy_(values)
        else:
            part.index_copy_(0, self.rows.to(part.device), values.to(part.device))

    def real_row(self, local_row: torch.Tensor) -> torch.Tensor:
        """Map rows of `view(...)` back to rows of the parameter."""
        return local_row if self.rows is None else self.rows.to(local_row.device)[local_row]

    def coordinates(self, flat: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameter (row, col) of flat row-major indices into `view(...)`, which has `cols`
        columns: integer division of the int64 indices, exact at any size."""
        return self.real_row(torch.div(flat, cols, rounding_mode="floor")), flat % cols


@dataclass
class ScoredParam:
    """A parameter the engine scores, the module that consumes it, and its logical matrices."""

    name: str
    param: nn.Parameter
    module: nn.Module
    matrices: list[LogicalMatrix] = field(default_factory=list)

    @property
    def experts(self) -> list[int | None]:
        """Expert slices of a 3-D expert tensor, or [None] for a plain matrix."""
        return list(range(self.param.shape[0])) if self.param.dim() == 3 else [None]

    @property
    def slots(self) -> list[Slot]:
        """The matrices the engine scores this parameter as: one per expert, or one."""
        return [(self.name, e) for e in self.experts]


#: `callback(inputs, outputs, expert, tokens=None)`: see `ModelAdapter.register_activation_hook`
ActivationCallback = Callable[..., None]
#: one matrix as the engine scores it: (parameter name, expert index or None)
Slot = tuple[str, "int | None"]


class ModelAdapter:
    """Knows one model family: which weights are scored and where each one sits.

    Subclasses usually only fill `model_types` and `components` (parameter-name suffix ->
    canonical component); families with fused tensors override `matrices`.
    """

    name: ClassVar[str]
    #: `config.model_type` values this adapter claims.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: True for the adapter that serves any model no other adapter claims (the generic one).
    fallback: ClassVar[bool] = False
    #: parameter-name suffix inside a block (without `.weight`) -> canonical component.
    components: ClassVar[dict[str, str]] = {}
    #: how block indices appear in parameter names.
    layer_pattern: ClassVar[re.Pattern[str]] = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

    # -- loading --------------------------------------------------------------------

    def load(self, source, dtype: torch.dtype, device: torch.device, *,
             trust_remote_code: bool = False, device_map: str | None = None):
        """Model (eval mode) and tokenizer. The default is transformers' Auto classes."""
        from esa_core.loading import load_pretrained

        return load_pretrained(source, dtype, device, trust_remote_code, device_map)

    # -- structure ------------------------------------------------------------------

    def component_of(self, name: str, model: nn.Module) -> str | None:
        """Canonical component of parameter `name`, or None if it is not a scorable weight."""
        if name.endswith(".weight"):
            stem = name[: -len(".weight")]
        else:
            stem = name
        if self.layer_pattern.search(name):
            for suffix, component in self.components.items():
                if stem.endswith(suffix):
                    return component
            return None
        return self.outside_component(name, model)

    def outside_component(self, name: str, model: nn.Module) -> str | None:
        """Embeddings and the output head, found through transformers' own accessors."""
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        param = dict(model.named_parameters()).get(name)
        if inp is not None and param is inp.weight:
            return "embed"
        if out is not None and param is getattr(out, "weight", None):
            return "lm_head"
        return None

    def layer_of(self, name: str) -> int | None:
        """Block index of parameter `name`, or None outside the blocks."""
        match = self.layer_pattern.search(name)
        return int(match.group(1)) if match else None

    def matrices(self, name: str, param: nn.Parameter, component: str,
                 model: nn.Module) -> list[LogicalMatrix]:
        """Split one parameter into logical matrices (override for fused tensors).

        `component` is what `component_of` returned; a fused adapter may return its own label
        there (e.g. `fused.qkv`) and split it into canonical components here.
        """
        layer = self.layer_of(name)
        if param.dim() == 3:
            return [LogicalMatrix(name, layer, component, e) for e in range(param.shape[0])]
        return [LogicalMatrix(name, layer, component)]

    def scored_params(
        self,
        model: nn.Module,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> list[ScoredParam]:
        """The weights to score: 2-D (or 3-D expert) weights inside the blocks by default.

        `include`/`exclude` are component names or globs (`mlp.*`), applied to each logical
        matrix (so `--include attn.k` keeps only the key rows of a fused qkv tensor); including
        `embed` or `lm_head` adds those, which are left out by default as their gradients dominate.
        """
        for pattern in (*include, *exclude):
            if not any(fnmatch.fnmatchcase(c, pattern) for c in COMPONENTS):
                raise unknown_choice("component", pattern, COMPONENTS)
        modules = dict(model.named_modules())
        scored: list[ScoredParam] = []
        for name, param in model.named_parameters():
            if param.dim() not in (2, 3):
                continue
            component = self.component_of(name, model)
            if component is None:
                continue
            kept = [m for m in self.matrices(name, param, component, model)
                    if _wanted(m.component, include, exclude)]
            if kept:
                owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
                scored.append(ScoredParam(name, param, owner, kept))
        return scored

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """Facts the family can report about the scoring passes (e.g. an MoE's router load).

        The pipeline keeps this open while scoring and adds the dict, once the block has
        exited, to `sensitivity_stats.json`. The default observes nothing.
        """
        yield {}

    def register_activation_hook(self, scored: ScoredParam, callback: ActivationCallback):
        """Call `callback(inputs [tokens, in], outputs [tokens, out], expert, tokens)` on every
        forward.

        `tokens` (int64) says which of the forward's tokens, numbered row-major over its
        [batch, seq_len] input, the rows are; None when they are all of them, in order (the
        engine refuses anything else without it). The default serves a module that applies the
        weight as a linear map (nn.Linear and friends). Adapters with 3-D expert tensors
        override this to report per-expert tokens.
        """
        if scored.param.dim() != 2:
            raise EsaError(
                f"adapter '{self.name}' cannot capture activations of {scored.name} "
                f"(shape {tuple(scored.param.shape)})."
            )

        def hook(module, args, output):
            x = args[0]
            callback(x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]), None)

        return scored.module.register_forward_hook(hook)


def _wanted(component: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    def matches(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(component, p) for p in patterns)

    if exclude and matches(exclude):
        return False
    if include:
        return matches(include) or (
            component not in NOT_SCORED_BY_DEFAULT and not _narrows(include)
        )
    return component not in NOT_SCORED_BY_DEFAULT


def _narrows(include: Sequence[str]) -> bool:
    """`--include embed,lm_head` adds to the default set; `--include mlp.down` narrows it."""
    return any(p not in NOT_SCORED_BY_DEFAULT for p in include)
