"""A safetensors file written one tensor at a time, so a checkpoint shard never sits whole in memory.

``safetensors.torch.save_file`` takes every tensor of a file at once. The streaming path produces a
shard's tensors block by block, so it would hold the shard (up to ``max_shard_size``, by default
2 GB: most of a 7B model's INT4 checkpoint) in memory until its last block is done. Here each
tensor's bytes go to a spill file beside the target as soon as it is produced (with its sha256);
:meth:`ShardFile.finish` writes the header and copies the tensors into place in 16 MB pieces.

The layout is the safetensors format (8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors back to back), with the tensors ordered by element
size, largest first, then by name (every tensor stays aligned to its element size), and the header
as ``{"__metadata__": sorted metadata, name: {"dtype", "shape", "data_offsets"}}`` for the names in
sorted order. The same tensors and metadata always give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import AwqNbError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
COPY_BYTES = 16 << 20


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as stored (row-major, on the CPU), without a copy when it is contiguous there."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if data.device.type != "cpu":
        data = data.cpu()
    return memoryview(data.numpy())


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (any dtype)."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


class ShardFile:
    """One safetensors file under construction at ``path`` (spilled to ``path`` + ``.body``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.body_path = self.path.with_name(self.path.name + ".body")
        self.body = open(self.body_path, "wb")
        self.entries: dict[str, dict] = {}  # name -> dtype, shape, spill offset, size, itemsize, digest

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.entries:
            raise AwqNbError(f"internal error: tensor {name} written twice into {self.path.name}")
        if t.dtype not in DTYPES:
            raise AwqNbError(f"{name}: dtype {t.dtype} cannot be stored in safetensors here; convert it first.")
        data = tensor_bytes(t)
        start = self.body.tell()
        self.body.write(data)
        self.entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "start": start, "size": len(data),
                              "itemsize": t.element_size(), "digest": hashlib.sha256(data).hexdigest()}

    def digests(self) -> dict[str, str]:
        return {k: e["digest"] for k, e in sorted(self.entries.items())}

    def finish(self, metadata: dict[str, str]) -> Path:
        """Write the file (header, then the tensors copied from the spill file) and remove the spill."""
        self.body.close()
        order = sorted(self.entries, key=lambda k: (-self.entries[k]["itemsize"], k))
        offsets, at = {}, 0
        for k in order:
            offsets[k] = [at, at + self.entries[k]["size"]]
            at += self.entries[k]["size"]
        header = {"__metadata__": dict(sorted(metadata.items()))}
        header.update({k: {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": offsets[k]}
                       for k, e in sorted(self.entries.items())})
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self.body_path, "rb") as body:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for k in order:
                body.seek(self.entries[k]["start"])
                left = self.entries[k]["size"]
                while left:
                    piece = body.read(min(left, COPY_BYTES))
                    out.write(piece)
                    left -= len(piece)
        self.body_path.unlink()
        return self.path

    def abort(self) -> None:
        self.body.close()
        self.body_path.unlink(missing_ok=True)
