"""Token blocks: calibration and evaluation never overlap; seeds draw their own blocks."""

import pytest
import tiny
import torch

from esa_core import data
from esa_core.errors import EsaError


def test_bundled_wikitext_calibrates_on_valid_and_evaluates_on_test():
    texts = data.read_texts("wikitext2")
    assert texts.calibration != texts.evaluation
    assert "Homarus gammarus" in texts.calibration  # first article of the valid split
    assert texts.evaluation.startswith(" \n = Robert <unk> = ")  # first article of test


def test_code_is_the_standard_librarys_source_with_its_licence():
    import sysconfig
    from pathlib import Path

    texts = data.read_texts("code")
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0]
    assert texts.calibration.startswith(first.read_text(encoding="utf-8"))  # read at run time
    assert texts.evaluation is None and len(texts.calibration) <= data.CODE_BYTES
    assert "def " in texts.calibration and "PSF" in texts.licence
    tokens = data.tokenize(texts, tiny.tokenizer(), seq_len=64, eval_samples=4)
    assert "PSF" in tokens.manifest()["licence"] and len(tokens.eval_blocks) == 4


def test_single_text_is_split_into_disjoint_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(tiny.wikitext_sample(40_000))
    tokens = data.tokenize(data.read_texts(str(path)), tiny.tokenizer(), seq_len=32,
                           eval_samples=0)
    calibration = {tuple(b.tolist()) for b in tokens.calibration_pool}
    evaluation = {tuple(b.tolist()) for b in tokens.eval_blocks}
    assert calibration and evaluation and not calibration & evaluation
    assert len(tokens.eval_blocks) == (len(tokens.calibration_pool) + len(tokens.eval_blocks)) // 10


def test_seeds_draw_different_blocks_and_the_same_seed_the_same():
    tokens = data.TokenData("x", "0", 4, torch.arange(400).view(100, 4), torch.zeros(1, 4))
    a, b, again = tokens.draw(1337, 10), tokens.draw(123, 10), tokens.draw(1337, 10)
    assert torch.equal(a, again)
    assert not torch.equal(a, b)
    assert tokens.draws[1337] != tokens.draws[123]


def test_more_samples_than_the_pool_names_the_pool_size():
    tokens = data.TokenData("x", "0", 4, torch.zeros(7, 4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(EsaError, match="7 blocks"):
        tokens.draw(0, 8)


def test_hub_dataset_offline_names_local_alternatives(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(EsaError, match="wikitext2.*\\.txt file.*folder"):
        data.read_texts("Salesforce/wikitext")
