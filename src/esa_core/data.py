"""Text -> token blocks -> a calibration pool and held-out evaluation blocks that never overlap.

WikiText-2 (bundled): calibration blocks come from its valid split, evaluation blocks from its
test split. `code` (offline too): the Python standard library's own source files, read at run
time from the running interpreter, split by blocks like a local file. A local text file or
folder: one deterministic split of its blocks (the last tenth is held out). A Hugging Face
dataset name: its first text split, split the same way.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from esa_core.errors import EsaError
from esa_core.indices import evenly_spaced

BUNDLED = "wikitext2"
WIKITEXT_LICENCE = "CC BY-SA 3.0 (WikiText-2, Merity et al. 2016, from Wikipedia)"
CODE = "code"
CODE_LICENCE = "PSF-2.0 (Python Software Foundation License: the Python standard library)"
CODE_BYTES = 1_000_000  # whole files, in name order, up to this: about 250k tokens
HELD_OUT_FRACTION = 10  # one block in ten (the last tenth) of a single text is held out
CONTROL_BYTES = bytes(b for b in range(32) if chr(b) not in "\t\n\r\f\v")
MAX_CONTROL_SHARE = 0.1  # text has almost none; binary data that decodes as UTF-8 has many


@dataclass
class Texts:
    """Raw calibration and evaluation text (the same text when the split is by blocks)."""

    source: str
    calibration: str
    evaluation: str | None  # None: split the calibration text's blocks
    sha256: str
    licence: str | None = None  # where ESA knows it (the offline datasets)


@dataclass
class TokenData:
    """Token blocks [n, seq_len] for calibration (the pool seeds draw from) and evaluation."""

    source: str
    sha256: str
    seq_len: int
    calibration_pool: torch.Tensor
    eval_blocks: torch.Tensor
    draws: dict[int, list[int]] = field(default_factory=dict)
    licence: str | None = None

    def draw(self, seed: int, count: int) -> torch.Tensor:
        """`count` calibration blocks for `seed`: different seeds draw different blocks."""
        pool = len(self.calibration_pool)
        if count > pool:
            raise EsaError(
                f"--max-samples {count} is larger than the calibration pool: {pool} blocks of "
                f"{self.seq_len} tokens in {self.source}. Use --max-samples <= {pool} or a "
                "shorter --seq-len."
            )
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(pool, generator=generator)[:count]
        self.draws[seed] = indices.tolist()
        return self.calibration_pool[indices]

    def manifest(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "seq_len": self.seq_len,
            "n_calibration_pool": len(self.calibration_pool),
            "n_eval": len(self.eval_blocks),
            **({"licence": self.licence} if self.licence else {}),
        }


def _sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
    return digest.hexdigest()


def read_texts(dataset: str) -> Texts:
    """Read the text named by --dataset: `wikitext2`, `code`, a .txt file, a folder, or a hub
    dataset."""
    if dataset == BUNDLED:
        folder = resources.files("esa_core") / "assets" / "wikitext-2"
        valid = (folder / "valid.txt").read_text(encoding="utf-8")
        test = (folder / "test.txt").read_text(encoding="utf-8")
        return Texts("wikitext2 (bundled: valid -> calibration, test -> evaluation)", valid,
                     test, _sha256(valid, test), WIKITEXT_LICENCE)
    if dataset == CODE:
        return code_texts()
    path = Path(dataset).expanduser()
    if path.is_file():
        text = read_text_file(path)
        return Texts(str(path), text, None, _sha256(text))
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise EsaError(f"--dataset folder {path} has no .txt files.")
        text = "\n\n".join(read_text_file(f) for f in files)
        return Texts(str(path), text, None, _sha256(text))
    if dataset.startswith((".", "/", "~")) or dataset.endswith(".txt"):
        raise EsaError(f"--dataset path not found: {dataset}")
    return _hub_texts(dataset)


def code_texts() -> Texts:
    """Python source: the standard library's top-level modules of the running interpreter, whole
    files in name order up to CODE_BYTES. Its sha256 in the manifest tells one Python's library
    from another's."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if size + len(text) > CODE_BYTES and parts:
            break
        parts.append(text)
        size += len(text)
    if not parts:
        raise EsaError(f"--dataset code: no Python source files in {folder} (a Python installed "
                       "without its .py files?). Pass a folder of .txt files instead.")
    text = "\n\n".join(parts)
    return Texts(f"code (Python {sysconfig.get_python_version()} standard library, "
                 f"{len(parts)} files from {folder})", text, None, _sha256(text), CODE_LICENCE)


def read_text_file(path: Path) -> str:
    """The file's UTF-8 text; binary data (random bytes, a zip, a model file) is refused
    rather than tokenised into nonsense that still prints verdicts."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EsaError(f"--dataset {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                       f"offset {exc.start}): pass a plain-text .txt file.") from None
    control = len(data) - len(data.translate(None, CONTROL_BYTES))  # C speed, on any size
    if control > MAX_CONTROL_SHARE * len(data):
        raise EsaError(f"--dataset {path} is not text: {control} of its {len(data)} bytes are "
                       "control characters (binary data?). Pass a plain-text .txt file.")
    return text


def _hub_texts(name: str) -> Texts:
    local = f"Local choices: '{BUNDLED}' (bundled), a .txt file, or a folder of .txt files."
    try:
        import datasets
    except ImportError:
        raise EsaError(
            f"--dataset '{name}' looks like a Hugging Face dataset, but the `datasets` package is "
            f"not installed. {local}"
        ) from None
    repo, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(repo, config or None)
    except Exception as exc:  # offline, unknown name, ...
        raise EsaError(f"could not load dataset '{name}' ({type(exc).__name__}). {local}") from None
    split = next(iter(loaded.values()))
    column = next((c for c in split.column_names if c == "text"), split.column_names[0])
    text = "\n".join(str(t) for t in split[column])
    return Texts(f"hf:{name}", text, None, _sha256(text))


def _blocks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenize(texts: Texts, tokenizer, seq_len: int, eval_samples: int) -> TokenData:
    """Cut the text into blocks of `seq_len` tokens; keep calibration and evaluation disjoint."""
    calibration = _blocks(tokenizer, texts.calibration, seq_len)
    if texts.evaluation is not None:
        evaluation = _blocks(tokenizer, texts.evaluation, seq_len)
    else:
        held_out = max(1, len(calibration) // HELD_OUT_FRACTION) if len(calibration) > 1 else 0
        cut = len(calibration) - held_out
        calibration, evaluation = calibration[:cut], calibration[cut:]
    if len(calibration) == 0 or len(evaluation) == 0:
        raise EsaError(
            f"the dataset {texts.source} is too short for --seq-len {seq_len}: it gives "
            f"{len(calibration)} calibration and {len(evaluation)} evaluation blocks."
        )
    if eval_samples > 0 and eval_samples < len(evaluation):
        # evenly spaced over the held-out text: every run evaluates on the same blocks
        evaluation = evaluation[evenly_spaced(len(evaluation), eval_samples)]
    return TokenData(texts.source, texts.sha256, seq_len, calibration, evaluation,
                     licence=texts.licence)
