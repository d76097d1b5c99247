"""Quantize a model that does not fit in memory: one decoder block at a time, the checkpoint written shard by shard.

:func:`quantize_streaming` gives the checkpoint that ``load_model`` + :func:`awq_nb.search` +
:func:`awq_nb.apply_awq` + :func:`awq_nb.save_quantized` give, byte for byte, while holding only:

* the model's skeleton on the meta device (``accelerate.init_empty_weights``), with the tensors
  outside the decoder blocks that capturing block 0's inputs needs (embeddings, final norm) read
  from the safetensors shards; the embeddings are dropped again once captured and written, and
  the LM head is read only when its turn comes to be written;
* one decoder block, read from the shards (memory-mapped by ``safetensors.safe_open``) right
  before it is searched, then scaled, clipped, packed into the open output shard and dropped back
  to the meta device;
* the calibration hidden states, and the output shard being filled.

The search itself is :func:`awq_nb.engine.search_blocks`, the same code as the in-memory path;
the shards are planned and written by :class:`awq_nb.checkpoint.ShardWriter`, the same code as
``save_quantized``. So the two paths cannot drift apart, and a test compares their files.
"""
from __future__ import annotations

import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .arch import get_blocks, get_spec
from .checkpoint import (ShardWriter, _check_target, _open, _shards, _tensor_files, _units, output_dtype, parse_size,
                         remove_stale_partials)
from .config import AWQConfig
from .engine import _resolve_calib, check_finite, search_blocks
from .errors import AwqNbError
from .hub import is_hub_id, open_hub_model
from .memory import trim
from .models import _check_local_folder, _check_pickle_only, quant_method, resolve_model_path
from .packing import check_format
from .progress import Progress
from .results import AWQResult
from .settings import FULL
from .wqlinear import select_modules


def skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``path/config.json`` with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def load_tensors(model: nn.Module, keys: list[str], located: dict[str, Path], dtype: torch.dtype) -> None:
    """Read ``keys`` from the shards into ``model`` (floating tensors cast to ``dtype``), file by file."""
    from accelerate.utils import set_module_tensor_to_device

    by_file = defaultdict(list)
    for key in keys:
        by_file[located[key]].append(key)
    for file, names in by_file.items():
        f = _open(file)
        for key in names:
            t = f.get_tensor(key)
            set_module_tensor_to_device(model, key, "cpu", value=t.to(dtype) if t.is_floating_point() else t)
        if hasattr(located, "consumed"):  # a hub model's shards, fetched on demand (awq_nb/hub.py)
            located.consumed(names)


def _head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the output head (``lm_head.``), which the search never runs."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), "lm_head") if head is not None else "lm_head"
    return name + "."


def _drop(model: nn.Module, key: str) -> None:
    """Put tensor ``key`` back on the meta device (its memory is freed once nothing else holds it)."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, key, "meta")


CLIP_TENSORS = ("max_val", "ratios", "min_val", "min_ratios")


def spill_clips(records: list, folder: Path, name: str) -> None:
    """Move the tensors of ``records`` (ClipRecords) to ``folder/name`` and point the records at them,
    memory-mapped: same values, but paged in from disk only when read (plots, ``AWQResult.save``).
    They are ``[N, K/g]`` per Linear, 1/32 of the block's fp32 weights for ``g=128`` with both clip
    ends: kept in memory, they grew the streaming path's peak RSS by 12 MB a block on a 3B shape."""
    tensors = {f"{i}.{f}": getattr(r, f) for i, r in enumerate(records) for f in CLIP_TENSORS
               if getattr(r, f) is not None}
    if not tensors:
        return
    path = folder / name
    torch.save(tensors, path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    for key, t in mapped.items():
        i, f = key.split(".", 1)
        setattr(records[int(i)], f, t)


def _block_of(key: str, prefix: str) -> int | None:
    """The decoder block a tensor belongs to (None: outside the blocks)."""
    if not key.startswith(prefix):
        return None
    return int(key[len(prefix):].split(".", 1)[0])


def quantize_streaming(path, out_dir, config: AWQConfig, calib=FULL.calib, n_samples: int = FULL.n_samples, seqlen: int = FULL.seqlen,
                       seed: int = FULL.seed, device=None, dtype: torch.dtype = torch.float32, out_dtype: torch.dtype | None = None,
                       max_shard_size: int | str = "2GB", overwrite: bool = False, progress: Progress | None = None,
                       save_progress: Progress | None = None, revision: str | None = None,
                       delete_shards: bool = False) -> tuple[AWQResult, Path]:
    """Quantize the safetensors model at ``path`` (a folder, a bundled name or a hub id) with AWQ
    and write the AutoAWQ "gemm" checkpoint ``out_dir``, holding one decoder block in memory at a
    time (module docstring). Returns ``(result, out_dir)``.

    Arguments are those of :func:`awq_nb.search` and :func:`awq_nb.save_quantized`; ``dtype`` is the
    dtype the search computes in (as ``load_model(..., dtype=)``), ``out_dtype`` the checkpoint's.
    A hub id (at ``revision``) is downloaded shard by shard as the blocks need it (:mod:`awq_nb.hub`);
    ``delete_shards=True`` deletes each downloaded shard once all its tensors were read.
    """
    from transformers import AutoTokenizer

    folder, located = Path(resolve_model_path(str(path))), None
    if not folder.is_dir() and is_hub_id(str(path)):
        folder, located = open_hub_model(str(path), revision=revision, delete_shards=delete_shards)
    if not folder.is_dir():
        raise AwqNbError(f"quantize_streaming reads a local folder of safetensors shards or a hub id (owner/name); "
                         f"{path!r} is neither.")
    if quant_method(str(folder)) == "awq":
        raise AwqNbError(f"{folder} is already an AWQ checkpoint: quantize the original floating-point model instead.")
    _check_local_folder(str(folder), trust_remote_code=False)
    _check_pickle_only(folder, allow_pickle=False)
    check_format(config.w_bit, config.group_size, config.zero_point, name=f"AWQConfig({config.tag})")
    out = Path(out_dir)
    _check_target(out, overwrite)
    remove_stale_partials(out)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = _resolve_calib(tokenizer, calib, n_samples, seqlen, seed)

    model = skeleton(folder, dtype)
    spec = get_spec(model)
    prefix = spec.blocks + "."
    located = _tensor_files(folder) if located is None else located
    outside = [k for k in located if not k.startswith(prefix)]
    head = {k for k in outside if k.startswith(_head_prefix(model))}  # not needed before it is written
    load_tensors(model, [k for k in outside if k not in head], located, dtype)
    model.tie_weights()
    blocks = get_blocks(model, spec)
    block_keys = defaultdict(list)
    for key in located:
        if key.startswith(prefix):
            block_keys[_block_of(key, prefix)].append(key)

    convert, kept = select_modules(model, config)
    odtype = output_dtype(model, out_dtype)
    codes: dict = {}  # the codes a Gram-based rounding computed for the block being written
    plan = _shards(_units(model, config, convert, odtype, codes), parse_size(max_shard_size))
    # each unit with the block after which its tensors are final: a block's own units after that
    # block; the tensors outside the blocks before block 0 (embeddings) or after the last (norm, head)
    order, seen_block = [], False
    for unit in (u for shard in plan for u in shard):
        block = _block_of(next(iter(unit[0])), prefix)  # a unit's tensors share one owner
        seen_block = seen_block or block is not None
        order.append((unit, block if block is not None else (len(blocks) if seen_block else -1)))
    writer = ShardWriter(out, plan, save_progress)
    done = 0

    def flush(last_block: int) -> None:  # produce, in plan order, every unit whose tensors are final
        nonlocal done
        while done < len(order) and order[done][1] <= last_block:
            unit = order[done][0]
            lazy = [k for k in unit[0] if k in head]
            if lazy:
                load_tensors(model, lazy, located, dtype)
            writer.produce(unit)
            for k in lazy:
                _drop(model, k)
            done += 1

    def before_block(i: int, block: nn.Module) -> None:
        if i == 0:  # block 0's inputs are captured: embeddings already written go back to the meta device
            written = {k for unit, _ in order[:done] for k in unit[0]}
            for k in outside:
                if k in written and k not in head:
                    _drop(model, k)
        load_tensors(model, block_keys[i], located, dtype)
        check_finite(block, f"{prefix}{i}.")  # check_model saw it on the meta device

    result = None
    # the search's clip records, off the heap (spill_clips); a mapped file outlives its unlinked name on
    # POSIX, and where it cannot be removed while mapped (Windows) the folder is left to the OS's cleanup
    spill = tempfile.TemporaryDirectory(prefix="awq_nb_clips_", ignore_cleanup_errors=True)
    try:
        flush(-1)
        for result, i in search_blocks(model, tokens, config, progress, device, before_block=before_block, in_place=True):
            codes.update(result.rounded)
            result.rounded.clear()
            flush(i)
            codes.clear()
            spill_clips([r for r in result.clips if r.block == i], Path(spill.name), f"block{i}.pt")
            blocks[i].to("meta")  # drop its weights: the next block is read from disk
            trim()
        flush(len(blocks))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # save_pretrained of a config built from meta tensors
            writer.finish(model, config, kept, odtype, tokenizer)
    except BaseException:
        writer.abort()
        raise
    finally:
        spill.cleanup()
    return result, out
