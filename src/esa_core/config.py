"""RunConfig: every setting of a run, validated once at the edge (CLI or Python API)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esa_core.errors import EsaError, unknown_choice
from esa_core.layout import CONTROLS
from esa_core.plugins import Registry
from esa_core.selection import MODES

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ACCUM_DTYPES = ("fp32", "bf16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# Defaults for the embedded model on a CPU: small enough to finish in well under two minutes.
CPU_SEQ_LEN, GPU_SEQ_LEN = 128, 512
CPU_MAX_SAMPLES, GPU_MAX_SAMPLES = 16, 200
CPU_EVAL_SAMPLES, GPU_EVAL_SAMPLES = 16, 64
# On a GPU, 4 blocks of 512 tokens (2048 tokens a pass) keep the tensor cores busy while an 8B
# model in bf16 (16 GB), its fp32 score set (28 GB) and the backward pass's activations (about
# 20 GB) stay under 80 GB; 8 blocks would not. Reasoned, not yet measured on a GPU
# (benchmarks/gpu_guide_8b.py measures it). A CPU keeps 1: its defaults are sized for 2 cores.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 1, 4
CHECKPOINT_POLICIES = ("auto", "always", "never")
# --ablate-top evaluates once per candidate: fewer blocks (see README for the noise floor)
CPU_ABLATE_SAMPLES, GPU_ABLATE_SAMPLES = 8, 64


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


def parse_list(text: str | list[str] | None) -> list[str]:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [t for t in text if t]
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_metric_args(pairs: list[str] | dict[str, Any] | None,
                      flag: str = "--metric-arg") -> dict[str, str]:
    """Repeated `key=value` flags (--metric-arg, --perturb-arg) as a dict."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EsaError(f"{flag} must look like key=value; got '{pair}'.")
        out[key.strip()] = value.strip()
    return out


@dataclass
class RunConfig:
    """Everything that decides a run's result. `resolved()` fills device-dependent defaults."""

    model: str | None = None
    metric: str = "grad_x_weight"
    mode: str = "per_layer"
    topk: int = 100
    max_samples: int | None = None
    seeds: list[int] = field(default_factory=lambda: [1337])
    stability_check: bool = False
    dtype: str = "auto"
    save_plots: bool = False
    verbose: bool = False
    out_dir: str | None = None
    perturb: str | None = None  # one type or several, comma-separated
    #: the guide's spellings of the perturbation options `scale` and `prob`; None: its default
    perturb_scale: float | None = None
    perturb_prob: float | None = None
    perturb_args: dict[str, str] = field(default_factory=dict)
    #: the lm_eval evaluator's options `tasks` and `limit`
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    controls: list[str] = field(default_factory=list)
    control_repeats: int = 0
    dataset: str = "wikitext2"
    seq_len: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    device_map: str | None = None
    eval_samples: int | None = None
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    adapter: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    metric_args: dict[str, str] = field(default_factory=dict)
    accum_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint: str = "auto"
    evaluator: list[str] = field(default_factory=lambda: ["perplexity"])
    ablate_top: int = 0
    critical_ratio: float = 2.0
    ablate_eval_samples: int | None = None

    def validate(self, registry: Registry) -> RunConfig:
        """Check every choice against the installed plugins; raise EsaError on the first problem."""
        registry.get("metric", self.metric)
        if self.mode not in MODES:
            raise unknown_choice("mode", self.mode, MODES)
        if self.dtype not in DTYPE_CHOICES:
            raise unknown_choice("dtype", self.dtype, DTYPE_CHOICES)
        if self.device not in DEVICE_CHOICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise unknown_choice("device", self.device, DEVICE_CHOICES)
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise unknown_choice("device map", self.device_map, DEVICE_MAPS)
        if self.accum_dtype not in ACCUM_DTYPES:
            raise unknown_choice("accumulator dtype", self.accum_dtype, ACCUM_DTYPES)
        if self.checkpoint not in CHECKPOINT_POLICIES:
            raise unknown_choice("checkpoint policy", self.checkpoint, CHECKPOINT_POLICIES)
        if self.topk <= 0:
            raise EsaError(f"--topk must be a positive integer; got {self.topk}.")
        sizes = (("--max-samples", self.max_samples), ("--seq-len", self.seq_len),
                 ("--batch-size", self.batch_size), ("--eval-samples", self.eval_samples))
        for name, value in sizes:
            if value is not None and value <= 0:
                raise EsaError(f"{name} must be a positive integer; got {value}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise EsaError("--seq-len must be at least 2 (one token predicts the next).")
        self.seeds = parse_seeds(self.seeds)
        if self.perturb_prob is not None and not 0.0 <= self.perturb_prob <= 1.0:
            raise EsaError(f"--perturb-prob must lie in [0, 1]; got {self.perturb_prob}.")
        if self.adapter is not None:
            registry.get("model adapter", self.adapter)
        if self.perturb is not None:
            if not self.perturb_types():
                raise EsaError("--perturb needs at least one perturbation name.")
            self._check_perturbation_options(
                [registry.get("perturbation", name) for name in self.perturb_types()])
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise EsaError(f"--eval-limit must be a positive integer; got {self.eval_limit}.")
        self.evaluator = parse_list(self.evaluator)
        if not self.evaluator:
            raise EsaError("--evaluator needs at least one evaluator name.")
        for name in self.evaluator:
            registry.get("evaluator", name)
        if self.ablate_top < 0:
            raise EsaError(f"--ablate-top must be 0 or more; got {self.ablate_top}.")
        if not self.critical_ratio > 0:
            raise EsaError(f"--critical-ratio must be positive; got {self.critical_ratio}.")
        if self.ablate_eval_samples is not None and self.ablate_eval_samples <= 0:
            raise EsaError("--ablate-eval-samples must be a positive integer; got "
                           f"{self.ablate_eval_samples}.")
        for control in self.controls:
            if control not in CONTROLS:
                raise unknown_choice("control", control, CONTROLS)
        if self.controls and self.perturb is None:
            raise EsaError("--controls needs --perturb: a control set is perturbed the same way "
                           "as the top-k to compare against it.")
        if self.control_repeats < 0:
            raise EsaError(f"--control-repeats must be 0 or more; got {self.control_repeats}.")
        if self.control_repeats and "random_k" not in self.controls:
            raise EsaError("--control-repeats draws extra random_k sets: it needs "
                           "--controls random_k.")
        if self.overwrite and self.resume:
            raise EsaError("--overwrite and --resume contradict each other: --overwrite starts "
                           "over, --resume continues the interrupted run.")
        if self.out_dir is not None and Path(self.out_dir).is_file():
            raise EsaError(f"--out-dir {self.out_dir} exists and is a file, not a folder.")
        # building the metric validates its options (unknown option, wrong type)
        registry.get("metric", self.metric)(**self.metric_args)
        return self

    def perturb_types(self) -> list[str]:
        """--perturb as a list of perturbation names (empty without --perturb)."""
        return parse_list(self.perturb)

    def _perturb_args(self) -> dict[str, Any]:
        """--perturb-arg, with --perturb-scale and --perturb-prob as `scale=` and `prob=`."""
        guide = {"scale": self.perturb_scale, "prob": self.perturb_prob}
        return {**{k: v for k, v in guide.items() if v is not None}, **self.perturb_args}

    def perturbation_options(self, cls: type) -> dict[str, Any]:
        """The perturbation options given that `cls` declares (with several --perturb types,
        `--perturb-scale` goes to those that have a scale)."""
        declared = {o.name for o in cls.options}
        return {k: v for k, v in self._perturb_args().items() if k in declared}

    def _check_perturbation_options(self, classes: list[type]) -> None:
        """Every option given is declared by some --perturb type; building each checks values."""
        for cls in classes:
            cls(**self.perturbation_options(cls))
        declared = sorted({o.name for cls in classes for o in cls.options})
        unknown = sorted(set(self._perturb_args()) - set(declared))
        if unknown:
            raise EsaError(f"{', '.join(c.name for c in classes)} has no option "
                           f"'{unknown[0]}'. Valid options: {', '.join(declared) or 'none'}.")

    def evaluator_options(self, cls: type) -> dict[str, Any]:
        """--eval-task and --eval-limit as `tasks=` and `limit=`, for an evaluator with them."""
        given = {"tasks": ",".join(self.eval_tasks) or None, "limit": self.eval_limit}
        declared = {o.name for o in getattr(cls, "options", ())}
        return {k: v for k, v in given.items() if v is not None and k in declared}

    def resolved(self, device_type: str) -> RunConfig:
        """Fill the defaults that depend on the device (shorter, fewer blocks on a CPU)."""
        on_gpu = device_type == "cuda"
        if self.seq_len is None:
            self.seq_len = GPU_SEQ_LEN if on_gpu else CPU_SEQ_LEN
        if self.max_samples is None:
            self.max_samples = GPU_MAX_SAMPLES if on_gpu else CPU_MAX_SAMPLES
        if self.eval_samples is None:
            self.eval_samples = GPU_EVAL_SAMPLES if on_gpu else CPU_EVAL_SAMPLES
        if self.batch_size is None:
            self.batch_size = GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE
        if self.ablate_eval_samples is None:
            self.ablate_eval_samples = min(self.eval_samples, GPU_ABLATE_SAMPLES if on_gpu
                                           else CPU_ABLATE_SAMPLES)
        return self

    def default_out_dir(self, model_id: str) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")
        return Path("outputs") / "esa" / safe / f"{self.metric}_{self.mode}_k{self.topk}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
