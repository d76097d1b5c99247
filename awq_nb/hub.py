"""A hub model for the streaming path, downloaded shard by shard as the blocks need it.

:func:`open_hub_model` fetches the small files first (config, tokenizer, generation config, the
safetensors index) with ``huggingface_hub.hf_hub_download``, and returns the folder they are in
with a :class:`LazyShards` map from tensor name to file. A shard is downloaded the first time one
of its tensors is looked up, so :func:`awq_nb.streaming.quantize_streaming` starts quantizing after
the first shard and spreads the download over the run. With ``delete_shards=True`` the shards go to
a temporary folder and each is deleted once all its tensors were read, so the disk holds about one
shard at a time instead of the whole model.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from .errors import AwqNbError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The files fetched before any weights: top-level configs, tokenizer files and the index.
SMALL_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path (a bundled name or a folder is resolved before this)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).exists()


class LazyShards(Mapping):
    """Tensor name -> local safetensors file; looking a tensor up downloads its shard if needed.

    ``fetched`` lists the shards in the order they were downloaded. ``consumed(keys)`` tells it
    that ``keys`` were read; with ``delete_after_read`` a shard whose tensors were all read is
    deleted (it is downloaded again if a tensor of it is looked up later)."""

    def __init__(self, weight_map: dict[str, str], download, delete_after_read: bool = False,
                 fetched: dict[str, Path] | None = None):
        self._map = dict(weight_map)
        self._download = download  # file name in the repository -> local path
        self._local: dict[str, Path] = dict(fetched or {})
        self._left = Counter(self._map.values())
        self.delete_after_read = delete_after_read
        self.fetched: list[str] = list(self._local)
        self.deleted: list[str] = []

    def __getitem__(self, key: str) -> Path:
        name = self._map[key]
        if name not in self._local:
            self._local[name] = Path(self._download(name))
            self.fetched.append(name)
        return self._local[name]

    def __iter__(self):
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def consumed(self, keys) -> None:
        for key in keys:
            name = self._map[key]
            self._left[name] -= 1
            if self._left[name] == 0 and self.delete_after_read and name in self._local:
                self._local.pop(name).unlink(missing_ok=True)
                self.deleted.append(name)


def _hub_error(repo_id: str, what: str, e: Exception) -> AwqNbError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return AwqNbError(f"could not {what} of {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {first}). Check "
                      "the id and the network (gated models need `huggingface-cli login`), or download it yourself "
                      "(huggingface_hub.snapshot_download) and pass the folder.")


def open_hub_model(repo_id: str, revision: str | None = None, download_dir=None,
                   delete_shards: bool = False) -> tuple[Path, LazyShards]:
    """``(folder, located)`` for a hub model: the small files downloaded into ``folder``, the
    safetensors shards downloaded on first use (:class:`LazyShards`).

    ``download_dir``: where the files go (default: the Hugging Face cache; with ``delete_shards``,
    a new temporary folder, since files in the cache are shared by every program that uses it)."""
    import huggingface_hub

    if delete_shards and download_dir is None:
        download_dir = tempfile.mkdtemp(prefix="awq_nb-hub-")

    def download(filename: str) -> str:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=download_dir)
        except (OSError, ValueError) as e:
            raise _hub_error(repo_id, f"download {filename}", e) from None

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(repo_id, "list the files", e) from None
    small = [f for f in files if "/" not in f and f.endswith(SMALL_SUFFIXES)]
    if "config.json" not in small:
        raise AwqNbError(f"{repo_id!r} has no config.json at its top level: it is not a transformers model repository.")
    folder = Path(download("config.json")).parent
    for f in small:
        if f != "config.json":
            download(f)
    fetched = {}
    if INDEX_NAME in files:
        import json

        weight_map = json.loads((folder / INDEX_NAME).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise AwqNbError(f"{repo_id!r}: {INDEX_NAME} has no weight_map; the repository is damaged.")
    elif SINGLE_NAME in files:
        from safetensors import safe_open

        fetched[SINGLE_NAME] = Path(download(SINGLE_NAME))  # one shard: the whole model, needed anyway
        with safe_open(str(fetched[SINGLE_NAME]), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
    else:
        pickles = [f for f in files if f.endswith((".bin", ".pt"))]
        raise AwqNbError(f"{repo_id!r} has no safetensors weights{f' (only {pickles[:3]})' if pickles else ''}: the "
                         "streaming path reads safetensors only. Convert it (see load_model's allow_pickle) or choose "
                         "another repository.")
    return folder, LazyShards(weight_map, download, delete_after_read=delete_shards, fetched=fetched)
