import pytest
import torch

import awq_nb
from awq_nb.data import load_texts, sotu_texts


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def test_sotu_years_do_not_overlap():
    calib, evals = load_texts("sotu", "calib"), load_texts("sotu", "eval")
    assert len(calib) > 50 and len(evals) > 20
    assert not set(calib) & set(evals)
    assert "Union" in " ".join(sotu_texts((1990, 1991)))


def test_calibration_is_seeded_and_deterministic(tok):
    a = awq_nb.calibration_blocks(tok, "sotu", n_samples=8, seqlen=64, seed=3)
    b = awq_nb.calibration_blocks(tok, "sotu", n_samples=8, seqlen=64, seed=3)
    c = awq_nb.calibration_blocks(tok, "sotu", n_samples=8, seqlen=64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8  # distinct windows


def test_strings_and_files(tok, tmp_path):
    text = " ".join(sotu_texts((1861, 1865)))
    blocks = awq_nb.calibration_blocks(tok, [text], n_samples=4, seqlen=128)
    assert blocks.shape == (4, 128)
    f = tmp_path / "speech.txt"
    f.write_text(text)
    assert torch.equal(awq_nb.calibration_blocks(tok, str(f), n_samples=4, seqlen=128), blocks)


def test_too_little_text_says_the_counts(tok):
    with pytest.raises(awq_nb.AwqNbError, match=r"too short: \d+ tokens make 0 windows of 512, but n_samples=4"):
        awq_nb.calibration_blocks(tok, ["Four score and seven years ago."], n_samples=4, seqlen=512)


def test_missing_and_empty_sources(tok, tmp_path):
    with pytest.raises(awq_nb.AwqNbError, match="neither 'sotu'.*nor an existing file"):
        awq_nb.calibration_blocks(tok, str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(awq_nb.AwqNbError, match="is empty"):
        awq_nb.calibration_blocks(tok, str(tmp_path / "empty.txt"))
    with pytest.raises(awq_nb.AwqNbError, match="sotu:1900-1989"):
        load_texts("sotu:nineteen")


def test_eval_windows_are_consecutive(tok):
    w = awq_nb.eval_windows(tok, "sotu", seqlen=256, max_windows=3)
    stream = awq_nb.data.token_stream(tok, load_texts("sotu", "eval"))
    assert torch.equal(w.reshape(-1), stream[: 3 * 256])
    assert awq_nb.data.bos_prefix(tok) is None  # SmolLM2 adds no BOS: windows are plain text
