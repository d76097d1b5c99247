"""A hub model streams shard by shard: each shard is downloaded when its first tensor is needed, and
the checkpoint equals the one from the same model in a local folder. The hub is faked offline:
``huggingface_hub.hf_hub_download`` and ``list_repo_files`` copy from a folder saved here."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from awq_nb import AWQConfig, AwqNbError
from awq_nb.hub import is_hub_id, open_hub_model
from awq_nb.streaming import quantize_streaming
from tiny_models import tiny_model, tiny_tokenizer

REPO = "someone/tiny-llama"
CONFIG = AWQConfig(w_bit=4, group_size=32, n_grid=4, clip_grid=4)


def _saved(tmp_path, layers=4) -> Path:
    folder = tmp_path / "repo"
    tiny_model("llama", layers=layers).save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _fake_hub(monkeypatch, repo: Path, cache: Path, dirs: set | None = None) -> list:
    """Serve ``repo`` as the hub repository REPO; returns the log of downloaded file names (and adds
    the folders they went to to ``dirs``)."""
    import huggingface_hub

    log = []
    dirs = set() if dirs is None else dirs

    def list_repo_files(repo_id, revision=None, **kw):
        assert repo_id == REPO
        return sorted(p.name for p in repo.iterdir())

    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kw):
        assert repo_id == REPO
        log.append(filename)
        target = Path(local_dir) if local_dir is not None else cache
        dirs.add(target)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / filename, target / filename)
        return str(target / filename)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return log


def _watch_reads(monkeypatch, weight_map: dict, log: list) -> list:
    """Before each read from the shards: (shards needed so far, shards downloaded so far)."""
    import awq_nb.streaming as streaming

    real, needed, seen = streaming.load_tensors, [], []

    def spy(model, keys, located, dtype):
        for k in keys:
            if weight_map[k] not in needed:
                needed.append(weight_map[k])
        real(model, keys, located, dtype)
        seen.append((list(needed), [f for f in log if f.endswith(".safetensors")]))

    monkeypatch.setattr(streaming, "load_tensors", spy)
    return seen


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("delete_shards", [False, True])
def test_hub_model_streams_shard_by_shard(tmp_path, monkeypatch, delete_shards):
    repo = _saved(tmp_path)
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_streaming(repo, tmp_path / "local", CONFIG, calib=tokens, progress=lambda *a: None)

    dirs = set()
    log = _fake_hub(monkeypatch, repo, tmp_path / "hf-cache", dirs)
    seen = _watch_reads(monkeypatch, weight_map, log)
    on_disk = []
    if delete_shards:
        import awq_nb.hub

        real_consumed = awq_nb.hub.LazyShards.consumed

        def consumed(self, keys):
            real_consumed(self, keys)
            on_disk.append(len(set(self._local)))

        monkeypatch.setattr(awq_nb.hub.LazyShards, "consumed", consumed)
    _, out = quantize_streaming(REPO, tmp_path / "hub", CONFIG, calib=tokens, progress=lambda *a: None,
                                delete_shards=delete_shards)

    _same_files(tmp_path / "local", out)
    first_shard = next(i for i, f in enumerate(log) if f.endswith(".safetensors"))
    assert "config.json" in log[:first_shard] and "model.safetensors.index.json" in log[:first_shard]
    assert "tokenizer.json" in log[:first_shard]
    # every read downloaded exactly the shards needed so far, in the order they were first needed
    assert all(needed == fetched for needed, fetched in seen), seen
    assert len(seen[0][1]) < len(shards)  # the first read (embeddings, norm) did not fetch everything
    if delete_shards:
        assert log.count(shards[0]) == 1 and max(on_disk) < len(shards)
        (folder,) = dirs
        assert folder != tmp_path / "hf-cache" and not list(folder.glob("*.safetensors"))  # a temporary folder, emptied
        shutil.rmtree(folder)
    else:
        assert sorted(log[first_shard:]) == shards  # each once


def test_single_file_hub_model(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    tiny_model("llama", layers=2).save_pretrained(repo)
    tiny_tokenizer().save_pretrained(repo)
    assert (repo / "model.safetensors").is_file()
    log = _fake_hub(monkeypatch, repo, tmp_path / "hf-cache")
    folder, located = open_hub_model(REPO)
    assert log.count("model.safetensors") == 1 and (folder / "config.json").is_file()
    assert located["model.embed_tokens.weight"] == folder / "model.safetensors"
    assert log.count("model.safetensors") == 1  # looked up, not fetched again


def test_hub_errors_name_the_fix(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo / "pytorch_model.bin").write_bytes(b"")
    _fake_hub(monkeypatch, repo, tmp_path / "hf-cache")
    with pytest.raises(AwqNbError, match="no safetensors weights.*pytorch_model.bin"):
        open_hub_model(REPO)

    def offline(repo_id, revision=None, **kw):
        raise OSError("cannot reach https://huggingface.co")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(AwqNbError, match="could not list the files of 'someone/tiny-llama'.*snapshot_download"):
        open_hub_model(REPO)


def test_is_hub_id(tmp_path):
    assert is_hub_id("meta-llama/Llama-3.1-8B")
    assert not is_hub_id("smollm2-135m") and not is_hub_id("./a/b") and not is_hub_id("a/b/c")
    (tmp_path / "x").mkdir()
    assert not is_hub_id(str(tmp_path / "x"))


@pytest.mark.parametrize("streaming", ["on", "auto"])
def test_cli_streams_a_hub_model(tmp_path, monkeypatch, streaming):
    # on; or auto, when the size config.json gives (the only file fetched to decide) exceeds 40 % of the free RAM
    import tempfile

    import awq_nb.memory
    from awq_nb.cli import main
    from transformers import AutoConfig

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # --delete-shards downloads into a temporary folder
    repo = _saved(tmp_path, layers=2)
    log = _fake_hub(monkeypatch, repo, tmp_path / "hf-cache")
    read = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, **kw: read(repo if name == REPO else name, **kw))
    monkeypatch.setattr(awq_nb.memory, "available_ram_bytes", lambda: 100_000)  # the tiny model is ~0.3 MB
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"t{i % 128}" for i in range(4000)))
    args = ["quantize", REPO, "--out", str(tmp_path / "q"), "--group-size", "32", "--calib", str(calib), "--n-samples",
            "2", "--seqlen", "32", "--n-grid", "2", "--no-clip", "--streaming", streaming, "--delete-shards",
            "--save-search", "no"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "q" / "awq_nb_summary.json").read_text())
    assert summary["streaming"] and summary["format"] == "awq-gemm"
    assert any(f.endswith(".safetensors") for f in log) and (tmp_path / "q" / "config.json").is_file()
