import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama-config model with its tokenizer (a local --model folder)."""
    return tiny.save(tiny.llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """40,000 characters of the bundled WikiText-2 as a --dataset file."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(tiny.wikitext_sample(40_000))
    return path


@pytest.fixture(scope="session")
def registry():
    from esa_core.plugins import registry as load

    return load()


@pytest.fixture(scope="session")
def full_result(tmp_path_factory) -> Path:
    """A result folder with every file a run with all stages writes (see result_folders.py)."""
    import result_folders

    return result_folders.full_run(tmp_path_factory.mktemp("full-result") / "run")
