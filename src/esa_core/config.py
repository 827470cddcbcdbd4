"""RunConfig: every setting of a run, each declared once, validated once at the edge.

A setting is a field of RunConfig whose metadata is its `RunOption`: help, default on a CPU
and on a GPU, choices, bounds, whether it changes the results, the plugin option it sets. The
`esa run` command, the validation, the manifest's config, the `--resume` comparison and the
README's option table are all read from these declarations, so adding an option is one field
here plus the code that uses it. Torch-free: `esa --help` and `esa report` import it cheaply.
"""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from esa_core.errors import EsaError, unknown_choice
from esa_core.layout import CONTROLS, MODES, RANDOM_K

if typing.TYPE_CHECKING:
    from esa_core.plugins import Registry

# How a value is written on the command line.
VALUE = "value"  # one int, float, string or switch
LIST = "list"  # comma-separated names: `random_k,bottom_k`
SEEDS = "seeds"  # comma-separated non-negative integers: `1337,123,999`
PAIRS = "pairs"  # a repeatable `key=value`: plugin options


@dataclass(frozen=True)
class RunOption:
    """One setting of `esa run`: everything the CLI, the checks, `--resume` and the README show.

    `cpu`/`gpu` are the defaults on each device when they differ (the field then defaults to
    None until `RunConfig.resolved` fills it). `sets` names the plugin option this setting
    spells: `("perturbation", "scale")` for `--perturb-scale`, or `("metric", None)` for the
    `key=value` options of every chosen metric. `results=False` marks a setting that says
    where or how verbosely to write, never what is computed: `--resume` may change it.
    """

    help: str
    default: Any = None
    cpu: Any = None
    gpu: Any = None
    written: str = VALUE
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a value outside `choices` may match this regex (cuda:N)
    what: str | None = None  # the noun of "unknown <what>"; default: the name
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    positive: bool = False  # a number that must be > 0 (a ratio)
    plugin: str | None = None  # the value names plugins of this kind
    sets: tuple[str, str | None] | None = None
    results: bool = True
    flag: str | None = None  # the command-line spelling; default: --name-with-dashes
    short: str | None = None
    name: str = ""  # the RunConfig field and its type, filled from the dataclass
    type: Any = None

    @property
    def spelling(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def by_device(self) -> bool:
        return self.gpu is not None

    def describe_default(self) -> str:
        """The default as the help and the README say it."""
        if self.by_device:
            return f"{self.cpu} on a CPU, {self.gpu} on a GPU"
        if self.default is None or self.default is False or self.default in ([], {}):
            return ""
        value = self.default
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    def parse(self, value: Any) -> Any:
        """The written form (a CLI string, or the Python API's value) as the field holds it."""
        if self.written == LIST:
            return parse_list(value)
        if self.written == SEEDS:
            return parse_seeds(value)
        if self.written == PAIRS:
            return parse_pairs(value, self.spelling)
        return value

    def check(self, value: Any, registry: Registry) -> None:
        """Choices, plugin names and bounds; the first problem is an EsaError of one line."""
        if value is None:
            return
        if self.plugin is not None:
            names = parse_list(value)
            if not names:
                raise EsaError(f"{self.spelling} needs at least one {self.plugin} name.")
            for name in names:
                registry.get(self.plugin, name)
        if self.choices is not None:
            for choice in value if isinstance(value, list) else [value]:
                if choice not in self.choices and not (
                        self.pattern and re.fullmatch(self.pattern, choice)):
                    raise unknown_choice(self.what or self.name, choice, self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if self.positive and not value > 0:
            raise EsaError(f"{self.spelling} must be positive; got {value}.")
        if self.high is not None and not self.low <= value <= self.high:
            raise EsaError(f"{self.spelling} must lie in [{self.low:g}, {self.high:g}]; "
                           f"got {value}.")
        if self.low is not None and value < self.low:
            need = {0: "be 0 or more", 1: "be a positive integer"}.get(
                self.low, f"be at least {self.low:g}")
            raise EsaError(f"{self.spelling} must {need}; got {value}.")


def option(help: str, default: Any = None, **declared: Any) -> Any:
    """A RunConfig field declared by its RunOption (mutable defaults are copied per config)."""
    spec = RunOption(help, default, **declared)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": spec})
    return field(default=default, metadata={"option": spec})


def parse_seeds(text: str | list[int] | tuple[int, ...]) -> list[int]:
    """`1337,123,999` -> [1337, 123, 999]; duplicates and non-integers are errors."""
    if isinstance(text, (list, tuple)):
        seeds = [int(s) for s in text]
    else:
        parts = [p.strip() for p in str(text).split(",")]
        if not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise EsaError(
                f"--seeds must be comma-separated integers like 1337,123,999; got '{text}'."
            )
        seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise EsaError(f"--seeds has a repeated seed: {text}.")
    if any(s < 0 for s in seeds):
        raise EsaError(f"--seeds must be non-negative: {text}.")
    return seeds


def parse_sizes(text: str | list[Any] | None) -> list[int]:
    """`50,100,500` -> [50, 100, 500]: distinct positive integers, ascending."""
    parts = parse_list(text) if isinstance(text, str) or text is None else list(text)
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise EsaError(f"--protect-k must be comma-separated positive integers like 50,100,500; "
                       f"got '{text}'.") from None
    if any(k <= 0 for k in sizes) or len(set(sizes)) != len(sizes):
        raise EsaError(f"--protect-k must be distinct positive integers; got '{text}'.")
    return sorted(sizes)


def parse_list(text: str | list[str] | None) -> list[str]:
    """`a, b,` -> ['a', 'b']; a list stays a list (empty names dropped)."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [t for t in text if t]
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_pairs(pairs: list[str] | dict[str, Any] | None, flag: str) -> dict[str, Any]:
    """Repeated `key=value` flags (`--metric-arg`, `--perturb-arg`, `--eval-arg`) as a dict."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EsaError(f"{flag} must look like key=value; got '{pair}'.")
        out[key.strip()] = value.strip()
    return out


@dataclass
class Plugins:
    """The plugins a run uses, each built with its options before the model loads."""

    metric: Any
    perturbations: list[Any]
    evaluators: list[Any]
    remover: Any | None  # the rule --ablate-top removes a weight with
    protector: Any | None = None  # the rule --protect applies to every scored matrix


@dataclass
class RunConfig:
    """Everything that decides a run's result. `resolved()` fills device-dependent defaults.

    The Python API takes these fields as keywords: `esa_core.run(topk=50, seeds=[1, 2])`.
    """

    model: str | None = option(
        "Hugging Face hub id, local model folder or .gguf file. "
        "Default: the embedded SmolLM2-135M-Instruct.")
    metric: str = option("Sensitivity metric (see `esa list-plugins`).", "grad_x_weight",
                         plugin="metric")
    mode: str = option("per_layer: top-k in every weight matrix; global: top-k over the whole "
                       "model.", "per_layer", choices=MODES)
    topk: int = option("Number of critical weights (per matrix in per_layer).", 100, low=1)
    max_samples: int | None = option("Calibration blocks per seed.", cpu=16, gpu=200, low=1)
    seeds: list[int] = option("Comma-separated data seeds, e.g. 1337,123,999.", [1337],
                              written=SEEDS)
    stability_check: bool = option("Compare the seeds' top-k sets (Jaccard).", False)
    dtype: str = option("bf16, fp16, fp32 or auto (bf16 on GPU, fp32 on CPU).", "auto",
                        choices=("auto", "bf16", "fp16", "fp32"))
    save_plots: bool = option("Write figures to plots/.", False, results=False)
    verbose: bool = option("Log progress and tracebacks.", False, short="-v", results=False)
    quiet: bool = option("Print only the final line (and errors): no progress, criteria or top "
                         "weights.", False, short="-q", results=False)
    out_dir: str | None = option(
        "Result folder. Default: outputs/esa/<model>/<metric>_<mode>_k<topk>.", results=False)
    perturb: str | None = option(
        "Perturb the top-k: sign_flip, gauss_noise, bit_flip, zero, ...; several, "
        "comma-separated, are each tested (robustness).", plugin="perturbation")
    perturb_scale: float | None = option(
        "The perturbation's `scale` option. sign_flip: w <- -scale*w (default 1); "
        "gauss_noise: sigma = scale x std of the weight's own matrix (default 1).",
        sets=("perturbation", "scale"))
    perturb_prob: float | None = option(
        "The perturbation's `prob` option: bit_flip's per-bit flip probability (default 0.05).",
        low=0.0, high=1.0, sets=("perturbation", "prob"))
    perturb_args: dict[str, str] = option(
        "Perturbation option key=value (repeatable; see `esa list-plugins`).", {},
        written=PAIRS, flag="--perturb-arg", sets=("perturbation", None))
    eval_tasks: list[str] = option(
        "The lm_eval evaluator's `tasks` option: harness tasks, e.g. arc_easy,hellaswag, or a "
        "local task's YAML file (needs esa-toolkit[tasks]).", [], written=LIST,
        flag="--eval-task", sets=("evaluator", "tasks"))
    eval_limit: int | None = option(
        "The lm_eval evaluator's `limit` option: at most N items per task, for a quick run.",
        low=1, sets=("evaluator", "limit"))
    eval_args: dict[str, str] = option(
        "Evaluator option key=value (repeatable; see `esa list-plugins`).", {},
        written=PAIRS, flag="--eval-arg", sets=("evaluator", None))
    controls: list[str] = option("Control sets: random_k,bottom_k,magnitude_k.", [],
                                 written=LIST, choices=CONTROLS, what="control")
    control_repeats: int = option("Extra random_k draws for the significance test (p-value "
                                  "resolution 1/(seeds+N+1)).", 0, low=0)
    dataset: str = option("wikitext2 (bundled), code (the Python standard library's source, "
                          "offline), a .txt file, a folder of .txt files, or a Hugging Face "
                          "dataset name.", "wikitext2")
    seq_len: int | None = option("Tokens per block.", cpu=128, gpu=512, low=2)
    batch_size: int | None = option("Blocks per forward/backward pass.", cpu=1, gpu=4, low=1)
    device: str = option("auto, cpu, cuda or cuda:N.", "auto", choices=("auto", "cpu", "cuda"),
                         pattern=r"cuda:\d+")
    device_map: str | None = option(
        "Spread the model over the GPUs (and CPU) with accelerate: auto, balanced, "
        "balanced_low_0 or sequential; --device is then ignored for placement.",
        choices=("auto", "balanced", "balanced_low_0", "sequential"), what="device map")
    eval_samples: int | None = option("Held-out evaluation blocks.", cpu=16, gpu=64, low=1)
    overwrite: bool = option("Replace an existing result folder.", False, results=False)
    resume: bool = option("Continue an interrupted run in --out-dir (same flags); finished "
                          "seeds are not repeated.", False, results=False)
    trust_remote_code: bool = option("Allow a model's own Python code to run.", False)
    adapter: str | None = option("Model adapter (default: by model_type).",
                                 plugin="model adapter")
    include: list[str] = option("Components to score, e.g. mlp.down,moe.down or embed,lm_head "
                                "(added to the default set).", [], written=LIST)
    exclude: list[str] = option("Components not to score (globs allowed).", [], written=LIST)
    metric_args: dict[str, str] = option("Metric option key=value (repeatable).", {},
                                         written=PAIRS, flag="--metric-arg",
                                         sets=("metric", None))
    accum_dtype: str = option("Score accumulator dtype: fp32 or bf16.", "fp32",
                              choices=("fp32", "bf16"), what="accumulator dtype")
    gradient_checkpointing: bool = option("Recompute activations in the backward pass: less "
                                          "memory for long --seq-len.", False)
    checkpoint: str = option(
        "Save the seeds' running score sum for --resume: always, never, or auto (only when "
        "writing it is quick next to scoring a seed).", "auto",
        choices=("auto", "always", "never"), what="checkpoint policy", results=False)
    evaluator: list[str] = option(
        "Evaluators measuring each perturbed model, comma-separated; the first one's first "
        "measure is judged by the criteria.", ["perplexity"], written=LIST, plugin="evaluator")
    ablate_top: int = option("Zero each of the N top-ranked weights alone, measure, restore: "
                             "ablation.csv.", 0, low=0)
    critical_ratio: float = option("A weight is critical when removing it alone multiplies "
                                   "perplexity (the primary measure) by at least this.", 2.0,
                                   positive=True)
    ablate_eval_samples: int | None = option("Held-out blocks per ablation (at most "
                                             "--eval-samples).", cpu=8, gpu=64, low=1)
    protect: str | None = option(
        "Apply a rule to every scored matrix (e.g. rtn: round-to-nearest) keeping nothing, the "
        "top-k, or each --controls set exact: protection_results.json.", plugin="perturbation")
    protect_args: dict[str, str] = option(
        "--protect rule option key=value, e.g. bits=3 (repeatable).", {}, written=PAIRS,
        flag="--protect-arg")
    protect_k: list[int] = option(
        "Sizes of the kept sets, e.g. 50,100,500: prefixes of the top-k ranking (per matrix in "
        "per_layer). Default: --topk.", [], written=LIST)

    def validate(self, registry: Registry) -> RunConfig:
        """Check every setting and build every plugin with its options; raise EsaError (one
        line) on the first problem. Nothing here needs the model."""
        self.build(registry)
        return self

    def build(self, registry: Registry) -> Plugins:
        """The run's plugins, built and checked: every option declared, every measure unique."""
        for opt in OPTIONS:
            value = opt.parse(getattr(self, opt.name))
            setattr(self, opt.name, value)
            opt.check(value, registry)
        self._check_combinations()
        plugins = Plugins(
            metric=self._built(registry, "metric", [self.metric])[0],
            perturbations=self._built(registry, "perturbation", self.perturb_types()),
            evaluators=self._built(registry, "evaluator", self.evaluator),
            remover=registry.remover()() if self.ablate_top else None,
            protector=self._protector(registry))
        for rule in plugins.perturbations:
            if not rule.perturbs_selected():
                raise EsaError(f"--perturb {rule.name}: {rule.name} changes whole matrices, not "
                               f"selected weights; use it as --protect {rule.name}.")
        check_measures(plugins.evaluators, self.evaluator)
        for evaluator in plugins.evaluators:
            evaluator.check()
        return plugins

    def _check_combinations(self) -> None:
        if self.controls and self.perturb is None and self.protect is None:
            raise EsaError("--controls needs --perturb or --protect: a control set is perturbed "
                           "(or kept) the same way as the top-k to compare against it.")
        if self.control_repeats and RANDOM_K not in self.controls:
            raise EsaError(f"--control-repeats draws extra {RANDOM_K} sets: it needs "
                           f"--controls {RANDOM_K}.")
        if self.overwrite and self.resume:
            raise EsaError("--overwrite and --resume contradict each other: --overwrite starts "
                           "over, --resume continues the interrupted run.")
        if self.out_dir is not None and Path(self.out_dir).is_file():
            raise EsaError(f"--out-dir {self.out_dir} exists and is a file, not a folder.")

    def _protector(self, registry: Registry) -> Any | None:
        """--protect's rule built with --protect-arg; --protect-k's sizes (each a prefix of the
        top-k, so at most --topk; default --topk)."""
        if self.protect is None:
            if self.protect_args or self.protect_k:
                raise EsaError("--protect-arg and --protect-k need --protect RULE.")
            return None
        self.protect_k = parse_sizes(self.protect_k) or [self.topk]
        too_big = [k for k in self.protect_k if k > self.topk]
        if too_big:
            raise EsaError(f"--protect-k {too_big[0]} is larger than --topk {self.topk}: the kept "
                           "sets are prefixes of the top-k ranking; raise --topk.")
        return registry.get("perturbation", self.protect)(**self.protect_args)

    def perturb_types(self) -> list[str]:
        """--perturb as a list of perturbation names (empty without --perturb)."""
        return parse_list(self.perturb)

    def plugin_options(self, kind: str) -> dict[str, tuple[Any, RunOption]]:
        """Every option given for plugins of `kind`: name -> (value, the setting that gave it).
        A list (--eval-task a,b) is passed on as the comma-separated text it was written as."""
        given: dict[str, tuple[Any, RunOption]] = {}
        for opt in OPTIONS:
            if opt.sets is None or opt.sets[0] != kind:
                continue
            value = getattr(self, opt.name)
            if opt.sets[1] is None:
                given.update({k: (v, opt) for k, v in (value or {}).items()})
            elif value not in (None, []):
                text = ",".join(map(str, value)) if isinstance(value, list) else value
                given.setdefault(opt.sets[1], (text, opt))
        return given

    def options_for(self, kind: str, cls: type) -> dict[str, Any]:
        """The options given for `kind` that `cls` declares (with several --perturb types,
        `--perturb-scale` goes to those that have a scale)."""
        declared = {o.name for o in getattr(cls, "options", ())}
        return {k: v for k, (v, _) in self.plugin_options(kind).items() if k in declared}

    def _built(self, registry: Registry, kind: str, names: list[str]) -> list[Any]:
        """Each named plugin built with its options; an option no chosen plugin declares is an
        error, as is a plugin option given for a kind of plugin the run does not use."""
        classes = [registry.get(kind, name) for name in names]
        declared = sorted({o.name for cls in classes for o in getattr(cls, "options", ())})
        for key, (_, opt) in sorted(self.plugin_options(kind).items()):
            if key in declared:
                continue
            via = f" (from {opt.spelling})" if opt.sets[1] is not None else ""
            if not classes:
                raise EsaError(f"{opt.spelling} sets a {kind} option, but the run uses no {kind}: "
                               f"choose one with {selector(kind)}.")
            raise EsaError(f"{', '.join(names)} has no option '{key}'{via}. Valid options: "
                           f"{', '.join(declared) or 'none'}.")
        return [cls(**self.options_for(kind, cls)) for cls in classes]

    def resolved(self, device_type: str) -> RunConfig:
        """Fill the defaults that depend on the device (shorter, fewer blocks on a CPU)."""
        for opt in OPTIONS:
            if opt.by_device and getattr(self, opt.name) is None:
                setattr(self, opt.name, opt.gpu if device_type == "cuda" else opt.cpu)
        # an ablation pass uses a subset of the held-out blocks
        self.ablate_eval_samples = min(self.ablate_eval_samples, self.eval_samples)
        return self

    def default_out_dir(self, model_id: str) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")
        return Path("outputs") / "esa" / safe / f"{self.metric}_{self.mode}_k{self.topk}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_measures(evaluators: list[Any], names: list[str]) -> None:
    """Every evaluator's measures are well declared and no two share a name (before the model
    loads: `measures()` depends on the options only)."""
    from esa_core.api import DIFFERENCE, RELATIVE

    seen: dict[str, str] = {}
    for evaluator in evaluators:
        for m in evaluator.measures():
            if m.change not in (RELATIVE, DIFFERENCE):
                raise EsaError(f"evaluator '{evaluator.name}' declares measure '{m.name}' with "
                               f"an unknown change '{m.change}' (known: {RELATIVE}, "
                               f"{DIFFERENCE}).")
            for key in (m.name, m.change_name):
                if key in seen:
                    raise EsaError(f"--evaluator {','.join(names)}: evaluators "
                                   f"'{seen[key]}' and '{evaluator.name}' both declare the "
                                   f"measure '{key}'.")
                seen[key] = evaluator.name


def _declared() -> tuple[RunOption, ...]:
    hints = typing.get_type_hints(RunConfig)
    return tuple(replace(f.metadata["option"], name=f.name, type=_scalar(hints[f.name]))
                 for f in fields(RunConfig))


def _scalar(hint: Any) -> Any:
    """`int | None` -> int; other types as they are."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint


OPTIONS: tuple[RunOption, ...] = _declared()
#: settings that say where and how verbosely to write, not what is computed (--resume ignores)
NOT_RESULTS = frozenset(o.name for o in OPTIONS if not o.results)
#: the declared defaults of the settings whose default does not depend on the device
DEFAULTS = {o.name: o.default for o in OPTIONS if not o.by_device}


def selector(kind: str) -> str:
    """The flag that chooses plugins of `kind` (`--perturb` for perturbations)."""
    return next(o.spelling for o in OPTIONS if o.plugin == kind)


def option_table() -> str:
    """The README's table of `esa run` options, rendered from the declarations."""
    lines = ["| option | default | choices | changes results | what it does |",
             "|---|---|---|---|---|"]
    for o in OPTIONS:
        flag = o.spelling + (f", {o.short}" if o.short else "")
        value = {LIST: " A,B", SEEDS: " N,N", PAIRS: " KEY=VALUE"}.get(o.written) or {
            bool: "", int: " N", float: " X"}.get(o.type, " TEXT")
        choices = ", ".join(o.choices) if o.choices else (
            f"`esa list-plugins` ({o.plugin})" if o.plugin else "")
        cells = [f"`{flag}{value}`", o.describe_default(), choices,
                 "yes" if o.results else "no", o.help.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
