"""The streaming path writes the in-memory path's checkpoint, byte for byte, one block in memory at a time."""
from pathlib import Path

import pytest
import torch

import awq_nb
from awq_nb import AWQConfig
from awq_nb.checkpoint import load_quantized, save_quantized
from awq_nb.streaming import quantize_streaming
from tiny_models import tiny_model, tiny_tokenizer


def _mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address`` (Linux)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    return ""


def _model_folder(tmp_path, layers=3, tied=False):
    model = tiny_model("llama", layers=layers)
    if tied:  # SmolLM2-style: the LM head is the embedding (not stored, not written)
        model.config.tie_word_embeddings = True
        model.tie_weights()
    folder = tmp_path / "fp"
    model.save_pretrained(folder, max_shard_size="60KB")  # several safetensors shards, with an index
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied,rounding", [(False, "rtn"), (True, "rtn"), (False, "gptq")])
def test_streaming_checkpoint_equals_the_in_memory_one(tmp_path, tied, rounding):
    folder = _model_folder(tmp_path, tied=tied)
    assert len(list(folder.glob("*.safetensors"))) > 2
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    config = AWQConfig(w_bit=4, group_size=32, n_grid=4, clip_grid=4, modules_to_not_convert=["layers.1.mlp.up_proj"],
                       rounding=rounding)

    model, tok = awq_nb.load_model(str(folder), dtype=torch.float32)
    result = awq_nb.search(model, tokens, config, progress=lambda *a: None)
    awq_nb.apply_awq(model, result)
    a = save_quantized(model, tok, tmp_path / "memory", config, max_shard_size="30KB", rounded=result.rounded)

    streamed, b = quantize_streaming(folder, tmp_path / "stream", config, calib=tokens, max_shard_size="30KB",
                                     progress=lambda *a: None)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len([n for n in names if n.endswith(".safetensors")]) > 2
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert [r.best_alpha for r in streamed.scales] == [r.best_alpha for r in result.scales]
    # the clip records come back off the heap (memory-mapped from a spill file), with the same values
    assert [(c.block, c.layer) for c in streamed.clips] == [(c.block, c.layer) for c in result.clips] != []
    for c, ref in zip(streamed.clips, result.clips):
        if Path("/proc/self/maps").exists():
            assert "awq_nb_clips_" in _mapping_of(c.max_val.data_ptr()), c.layer
        for field in ("max_val", "ratios", "min_val", "min_ratios"):
            got, want = getattr(c, field), getattr(ref, field)
            assert (got is None and want is None) or torch.equal(got, want), (c.layer, field)
    streamed.save(tmp_path / "search.safetensors")  # readable after the spill folder is gone
    assert awq_nb.AWQResult.load(tmp_path / "search.safetensors").clips[0].max_val.equal(result.clips[0].max_val)
    load_quantized(b)  # and it loads, checksums verified
    assert ("lm_head.weight" in (b / "model.safetensors.index.json").read_text()) == (not tied)


def test_streaming_holds_one_block(tmp_path, monkeypatch):
    # Every block is read from disk right before its search and dropped right after it is written.
    import awq_nb.streaming as streaming

    folder = _model_folder(tmp_path, layers=4)
    seen = []
    real = streaming.load_tensors

    def spy(model, keys, located, dtype):
        blocks = model.model.layers
        seen.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))
        real(model, keys, located, dtype)

    monkeypatch.setattr(streaming, "load_tensors", spy)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    quantize_streaming(folder, tmp_path / "out", AWQConfig(group_size=32, n_grid=2, clip=False), calib=tokens,
                       progress=lambda *a: None)
    # the tensors outside the blocks, each of the 4 blocks, then the LM head (read only to be written):
    # every read happens with no decoder block materialized
    assert seen == [0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_cli_streaming_writes_the_same_checkpoint(tmp_path, rounding):
    # quantize --streaming on and off on the same folder: the same files, byte for byte, and the
    # summary says which path ran and what memory it took.
    import json
    import os
    import subprocess
    import sys

    folder = _model_folder(tmp_path)
    outs = {}
    for mode in ("on", "off"):
        out = tmp_path / f"q-{mode}"
        p = subprocess.run([sys.executable, "-m", "awq_nb", "quantize", str(folder), "--out", str(out), "--group-size", "32",
                            "--calib", str(_calib_file(tmp_path)), "--n-samples", "4", "--seqlen", "32", "--n-grid", "4",
                            "--clip-grid", "4", "--streaming", mode, "--save-search", "no", "--rounding", rounding],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        assert summary["streaming"] == (mode == "on") and summary["peak_rss_bytes"] > 0
        assert "peak_device_bytes" in summary and "RSS " in p.stderr  # the progress lines show memory
        outs[mode] = out
    names = sorted(p.name for p in outs["on"].iterdir() if p.name != "awq_nb_summary.json")
    assert names == sorted(p.name for p in outs["off"].iterdir() if p.name != "awq_nb_summary.json")
    for name in names:
        assert (outs["on"] / name).read_bytes() == (outs["off"] / name).read_bytes(), name


def _calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"t{i % 128}" for i in range(4000)))
    return path
