"""Save and load AWQ "gemm" checkpoints (the AutoAWQ format; see docs/format.md).

A checkpoint folder holds sharded ``*.safetensors`` (with ``model.safetensors.index.json`` when
there is more than one shard), ``config.json`` with a ``quantization_config``, the generation
config and the tokenizer files. Quantized Linears are stored as ``<name>.qweight/.qzeros/
.scales(/.bias)``; every other tensor in floating point under its usual name.

``save_quantized`` writes into a hidden sibling folder and moves it into place at the end, so a
failed or interrupted save never leaves a folder that looks complete. It never deletes what it did
not write: a non-empty target needs ``overwrite=True``, which replaces the checkpoint's own files
(and removes stale shards of an earlier checkpoint) and keeps every other file. Hidden partial
folders that a killed save left next to the target are removed by the next save to it, with a
warning. ``load_quantized`` builds
the model from ``config.json`` with empty weights, swaps in :class:`~awq_nb.wqlinear.WQLinear`
modules and reads the tensors with safetensors only (no pickle, no remote code), checking every
name, shape and dtype first.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .arch import find_quantizable, weight_nk
from .config import AWQConfig
from .errors import AwqNbError
from .kernels.layout import PACK_FACTOR
from .packing import SCALE_DTYPE, check_format, pack_codes
from .progress import Progress, silent
from .rounding import codes_for
from .shardfile import ShardFile, tensor_digest
from .wqlinear import WQLinear, matches_any, prepare_native, select_modules

QUANT_METHOD, FORMAT_VERSION = "awq", "gemm"
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
LEGACY_QUANT_CONFIG = "quant_config.json"  # older AutoAWQ repositories
QUANT_SUFFIXES = ("qweight", "qzeros", "scales")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_ST_DTYPES = {"I32": torch.int32, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"2GB"`` (10**9) or ``"500MiB"`` (2**20)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise AwqNbError(f"max_shard_size={size!r} is not a size: use bytes (int) or a string like '2GB' or '500MB'.")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def awq_quantization_config(config: AWQConfig, kept: list[str]) -> dict:
    """The ``quantization_config`` written to config.json (keys as AutoAWQ and transformers expect)."""
    skip = list(config.modules_to_not_convert) + [n for n in kept if not matches_any(n, config.modules_to_not_convert)]
    return {"quant_method": QUANT_METHOD, "bits": config.w_bit, "group_size": config.group_size,
            "zero_point": config.zero_point, "version": FORMAT_VERSION, "modules_to_not_convert": skip or None}


# ---------------------------------------------------------------------------------------------
# save


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def _tied_output_key(model: nn.Module) -> str | None:
    """``lm_head.weight`` (or the model's name for it) when the output embedding is tied to the input one."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None or get_out() is None or get_in() is None:
        return None
    out_w, in_w = get_out().weight, get_in().weight
    same = out_w is in_w or (out_w.shape == in_w.shape and out_w.data_ptr() == in_w.data_ptr())
    if getattr(model.config, "tie_word_embeddings", False) and not same:
        if out_w.shape != in_w.shape or not torch.equal(out_w.detach().cpu(), in_w.detach().cpu()):
            raise AwqNbError("config.tie_word_embeddings is True but the output embedding (lm_head) differs from the "
                             "input embedding; a loader would re-tie them. Set model.config.tie_word_embeddings=False "
                             "or call model.tie_weights() before saving.")
        same = True
    return f"{_module_name(model, get_out())}.weight" if same else None


def _resolve_config(model: nn.Module, config: AWQConfig | None) -> tuple[AWQConfig, dict[str, nn.Module], list[str]]:
    """The config to record, the fp Linears to pack while saving, and the quantizable Linears kept in fp."""
    wq = {n: m for n, m in model.named_modules() if isinstance(m, WQLinear)}
    if config is None:
        if not wq:
            raise AwqNbError("save_quantized: the model has no WQLinear modules and no config was given; pass "
                             "config=AWQConfig(w_bit=4, group_size=128) to quantize its Linears while saving.")
        first = next(iter(wq.values()))
        config = AWQConfig(w_bit=first.w_bit, group_size=first.group_size)
        convert, kept = {}, list(find_quantizable(model))  # the caller chose which Linears to convert
    else:
        convert, kept = select_modules(model, config)
    check_format(config.w_bit, config.group_size, config.zero_point, name=f"AWQConfig({config.tag})")
    for name, m in wq.items():
        if (m.w_bit, m.group_size) != (config.w_bit, config.group_size):
            raise AwqNbError(f"{name} is a WQLinear with w{m.w_bit}g{m.group_size} but the checkpoint is {config.tag}; "
                             "one checkpoint holds one bit width and group size. Re-quantize it with the same config.")
    return config, convert, kept


def _units(model, config, convert, dtype, rounded=None) -> list[tuple[dict[str, int], Callable[[], dict[str, torch.Tensor]]]]:
    """The checkpoint as units ``(bytes per tensor name, producer)``; a packed Linear is one unit,
    so its tensors never straddle two shards. ``rounded``: codes by Linear name (looked up when the
    unit is produced, so the streaming path may fill it block by block)."""
    tied_key = _tied_output_key(model)
    wq = {n for n, m in model.named_modules() if isinstance(m, WQLinear)}
    units, done = [], set()
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if key == tied_key or owner in done:
            continue
        if owner in convert:
            done.add(owner)
            n, k = weight_nk(convert[owner]).shape
            sizes = {f"{owner}.qweight": k * n // 2, f"{owner}.qzeros": k // config.group_size * n // 2,
                     f"{owner}.scales": k // config.group_size * n * 2}
            if getattr(convert[owner], "bias", None) is not None:
                sizes[f"{owner}.bias"] = n * dtype.itemsize
            units.append((sizes, lambda m=convert[owner], o=owner: _pack_module(m, o, config, dtype, rounded)))
            continue
        if owner in wq and key.endswith(".scales"):
            out_dtype = SCALE_DTYPE
        else:
            out_dtype = dtype if t.is_floating_point() else t.dtype
        # read the tensor when the unit is produced, not now: a streamed block is on the meta device here
        units.append(({key: t.numel() * out_dtype.itemsize}, lambda k=key, d=out_dtype: {k: _live(model, k).detach().to("cpu", d)}))
    return units


def _live(model: nn.Module, key: str) -> torch.Tensor:
    """The parameter or buffer ``key`` (a state_dict name) of ``model`` as it is now."""
    owner, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


@torch.no_grad()
def _pack_module(m: nn.Module, name: str, config: AWQConfig, dtype: torch.dtype, rounded=None) -> dict[str, torch.Tensor]:
    w = weight_nk(m)
    if w.device.type == "meta":
        raise AwqNbError(f"{name}.weight is on the meta device (offloaded?); load the model fully before saving.")
    r = codes_for(name, w, config, rounded)
    packed = pack_codes(r.codes if r.zero is not None else r.int_codes(), r.scale, r.zero, config.group_size)
    out = {f"{name}.{s}": t.cpu() for s, t in zip(QUANT_SUFFIXES, packed)}
    if getattr(m, "bias", None) is not None:
        out[f"{name}.bias"] = m.bias.detach().to("cpu", dtype)
    return out


def _shards(units, max_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for unit in units:
        nbytes = sum(unit[0].values())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


CHECKSUM_KEY = "awq_nb_sha256"  # safetensors metadata: {tensor name: sha256 of its stored bytes}


def _looks_like_awq_checkpoint(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file() or not any(folder.glob("*.safetensors")):
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AwqNbError(f"{out} exists and is a file; choose a folder path for the checkpoint.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        kind = "an AWQ checkpoint" if _looks_like_awq_checkpoint(out) else "files"
        raise AwqNbError(f"{out} is not empty (it holds {kind}: {shown}); pass overwrite=True to replace the "
                         "checkpoint files in it (other files are kept), or choose another folder.")


_SHARD = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_PROCESS_START = time.time()  # partial folders older than this process are left over from a killed save


def _is_weights_file(name: str) -> bool:
    """A weights shard or index a checkpoint writes (stale ones are removed on overwrite)."""
    return bool(_SHARD.match(name)) or name == INDEX_NAME


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the hidden ``.<out>.*partial*`` / ``.<out>.*.old`` folders next to ``out`` that an
    interrupted save left behind (older than this process), warn naming them, and return them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    stale = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if not p.is_dir() or not (p.name.endswith((".partial", ".old")) or ".partial-" in p.name):
            continue
        if p.stat().st_mtime < _PROCESS_START:
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    if stale:
        warnings.warn(f"removed {len(stale)} unfinished folder(s) left by an interrupted save of {out}: "
                      f"{', '.join(p.name for p in stale)}", stacklevel=2)
    return stale


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder's files to ``out``. A new ``out`` is one rename; an existing
    one gets each file replaced (``os.replace``), then loses only the weight shards and index of
    an earlier checkpoint that the new one did not write. Nothing else in ``out`` is touched."""
    if not out.exists():
        tmp.rename(out)
        return
    written = {f.name for f in tmp.iterdir()}
    stale = [f for f in out.iterdir() if f.is_file() and _is_weights_file(f.name) and f.name not in written]
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    for f in stale:
        f.unlink()
    tmp.rmdir()


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, config: AWQConfig | None = None,
                   max_shard_size: int | str = "2GB", dtype: torch.dtype | None = None, overwrite: bool = False,
                   progress: Progress | None = None, rounded: dict | None = None) -> Path:
    """Write ``model`` as an AWQ "gemm" checkpoint in ``out_dir`` and return its path.

    Linears that are already :class:`WQLinear` are written as they are; with ``config``, the
    decoder Linears it selects (:func:`awq_nb.wqlinear.select_modules`) are quantized from their
    current (AWQ-scaled) weights while writing, without changing ``model``: with the codes in
    ``rounded`` (``AWQResult.rounded``, required for ``config.rounding="gptq"``), else
    ``config.rounding`` applied now (:func:`awq_nb.rounding.codes_for`). Other floating-point
    tensors are written in ``dtype`` (default: the model's fp16/bf16 dtype, fp16 for fp32 models);
    a tied ``lm_head`` is not written. ``tokenizer`` may be None.

    ``out_dir`` must be missing or empty, unless ``overwrite=True``: then the checkpoint's files
    replace their namesakes, stale shards of an earlier checkpoint go, and every other file stays.
    ``progress(done, total, desc)`` hears of every shard (default: nothing shown).
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    remove_stale_partials(out)
    config, convert, kept = _resolve_config(model, config)
    dtype = output_dtype(model, dtype)
    shards = _shards(_units(model, config, convert, dtype, rounded), parse_size(max_shard_size))
    writer = ShardWriter(out, shards, progress)
    try:
        for unit in (u for shard in shards for u in shard):
            writer.produce(unit)
        writer.finish(model, config, kept, dtype, tokenizer)
    except BaseException:
        writer.abort()
        raise
    return out


def output_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``save_quantized`` writes floating-point tensors in: the model's fp16/bf16, else fp16."""
    if dtype is not None:
        return dtype
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


class ShardWriter:
    """Writes a checkpoint's planned shards (``_shards(_units(...))``) into a hidden partial folder
    as their units are produced, in order, then the index, config and tokenizer, and moves it into
    place (:func:`_commit`). ``save_quantized`` produces every unit at once; the streaming path
    produces a block's units right after the block is searched. Each unit's tensors go to disk as
    soon as it is produced (:class:`awq_nb.shardfile.ShardFile`), so no shard is held in memory."""

    def __init__(self, out: Path, shards: list[list], progress: Progress | None = None):
        self.out, self.shards = out, shards
        self.progress = progress or silent
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        self.shard, self.pending, self.file = 0, list(shards[0]) if shards else [], None
        self.weight_map, self.total = {}, 0

    def _name(self) -> str:
        n = len(self.shards)
        return WEIGHTS_NAME if n == 1 else f"model-{self.shard + 1:05d}-of-{n:05d}.safetensors"

    def produce(self, unit) -> None:
        """Produce the next unit of the plan (it must be the next one); a shard whose units are all
        produced is written and dropped from memory."""
        if not self.pending or unit is not self.pending[0]:
            raise AwqNbError("internal error: checkpoint units produced out of order")
        if self.file is None:
            self.progress(self.shard, len(self.shards), f"packing and writing shard {self.shard + 1}/{len(self.shards)}")
            self.file = ShardFile(self.tmp / self._name())
        sizes, make = self.pending.pop(0)
        for k, t in make().items():
            self.file.add(k, t)
        self.total += sum(sizes.values())
        if not self.pending:
            self._write()

    def _write(self) -> None:
        fname = self.file.path.name
        write_shard(self.file, {"format": "pt", CHECKSUM_KEY: json.dumps(self.file.digests())})
        self.weight_map.update(dict.fromkeys(self.file.entries, fname))
        self.file = None
        self.shard += 1
        self.pending = list(self.shards[self.shard]) if self.shard < len(self.shards) else []

    def finish(self, model: nn.Module, config: AWQConfig, kept: list[str], dtype: torch.dtype, tokenizer) -> None:
        """Index, config.json (with the quantization_config), generation config, tokenizer; commit."""
        if self.shard != len(self.shards):
            raise AwqNbError("internal error: the checkpoint was finished before every shard was written")
        tmp = self.tmp
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = copy.deepcopy(model.config)
        hf_config.quantization_config = awq_quantization_config(config, kept)
        hf_config.dtype = dtype
        hf_config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _commit(tmp, self.out)
        self.progress(len(self.shards), len(self.shards), f"saved {self.out}")

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_shard(file: ShardFile, metadata: dict[str, str]) -> Path:
    """Finish one safetensors shard (a function of its own, so tests can make it fail)."""
    return file.finish(metadata)


# ---------------------------------------------------------------------------------------------
# load


def read_quant_config(path: str | Path) -> dict:
    """The checkpoint's quantization settings, normalised to our ``quantization_config`` keys.

    Reads ``config.json``'s ``quantization_config``, else an older ``quant_config.json``
    (``w_bit``/``q_group_size``); accepts only 4-bit asymmetric AWQ in the "gemm" layout.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AwqNbError(f"{path} has no config.json; point load_quantized at the checkpoint folder.")
    raw, source = _read_json(cfg_file).get("quantization_config"), cfg_file
    if raw is None and (path / LEGACY_QUANT_CONFIG).is_file():
        raw, source = _read_json(path / LEGACY_QUANT_CONFIG), path / LEGACY_QUANT_CONFIG
        raw.setdefault("quant_method", QUANT_METHOD)
    if not isinstance(raw, dict):
        raise AwqNbError(f"{cfg_file} has no quantization_config (and there is no {LEGACY_QUANT_CONFIG}): this is not an "
                         "AWQ checkpoint. Load it with transformers, or quantize it with awq_nb first.")
    method = str(raw.get("quant_method", "")).lower()
    if method != QUANT_METHOD:
        raise AwqNbError(f"{source}: quant_method={raw.get('quant_method')!r} is not 'awq'; awq_nb loads AWQ "
                         "checkpoints only.")
    version = str(raw.get("version", raw.get("format", FORMAT_VERSION))).lower()
    if version != FORMAT_VERSION:
        raise AwqNbError(f"{source}: AWQ version {version!r} is not supported; awq_nb reads the 'gemm' layout only "
                         "('gemv'/'gemv_fast'/'marlin' store the weights differently). Use a 'gemm' export of this model "
                         "or re-quantize it with awq_nb.")
    q = {"quant_method": QUANT_METHOD, "bits": raw.get("bits", raw.get("w_bit")),
         "group_size": raw.get("group_size", raw.get("q_group_size")), "zero_point": raw.get("zero_point", True),
         "version": FORMAT_VERSION, "modules_to_not_convert": raw.get("modules_to_not_convert")}
    try:
        check_format(q["bits"], q["group_size"], bool(q["zero_point"]), name=str(source))
    except AwqNbError as e:
        raise AwqNbError(f"{e} (this checkpoint cannot be loaded as AWQ 'gemm')") from None
    return q


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AwqNbError(f"{file} is not valid JSON ({e}); re-download or re-save the checkpoint.") from None
    if not isinstance(data, dict):
        raise AwqNbError(f"{file} should hold a JSON object; re-download or re-save the checkpoint.")
    return data


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index, else from every file's header)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" It has {pickles[:3]}: awq_nb never unpickles weights; convert them to safetensors." if pickles else ""
        raise AwqNbError(f"{path} has no *.safetensors files.{hint}")
    index_file = path / INDEX_NAME
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise AwqNbError(f"{index_file} has no weight_map; re-save the checkpoint.")
        located = {k: path / f for k, f in weight_map.items()}
        for f in sorted(set(located.values())):
            if not f.is_file():
                raise AwqNbError(f"{index_file} lists {f.name}, which is missing from {path}; the download or save is "
                                 "incomplete: fetch that shard again.")
        return located
    located = {}
    for f in files:
        for k in _open(f).keys():
            located[k] = f
    return located


def _recorded_digests(f, file: Path) -> dict:
    raw = (f.metadata() or {}).get(CHECKSUM_KEY)
    if raw is None:
        return {}
    try:
        digests = json.loads(raw)
    except json.JSONDecodeError:
        raise AwqNbError(f"{file.name}: its checksum record is damaged; the file is corrupt: fetch or save it again "
                         "(verify=False loads it anyway).") from None
    return digests if isinstance(digests, dict) else {}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise AwqNbError(f"{file} is not a readable safetensors file ({e}); it is probably truncated or corrupt: "
                         "download or save it again.") from None


def _build_empty(path: Path, quant: dict, dtype: torch.dtype) -> nn.Module:
    """The model described by config.json, parameters on the meta device, quantizable Linears as WQLinear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise AwqNbError(f"transformers cannot read {path / 'config.json'} ({e}); awq_nb loads built-in architectures "
                         "only (trust_remote_code is off).") from None
    build_config = copy.deepcopy(hf_config)
    if hasattr(build_config, "quantization_config"):
        del build_config.quantization_config  # we swap the Linears ourselves
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(build_config, trust_remote_code=False)
    for name, m in find_quantizable(model).items():
        if matches_any(name, quant["modules_to_not_convert"]):
            continue
        n, k = weight_nk(m).shape
        if k % quant["group_size"] or n % PACK_FACTOR:
            raise AwqNbError(f"{name} ({k} -> {n}) cannot be a {quant['bits']}-bit group-{quant['group_size']} AWQ layer, "
                             "and the checkpoint's modules_to_not_convert does not list it; the config.json does not "
                             "match the tensors: add the module to modules_to_not_convert or re-export the checkpoint.")
        wq = WQLinear(quant["bits"], quant["group_size"], k, n, getattr(m, "bias", None) is not None, "meta", dtype)
        model.set_submodule(name, wq)
    model.config.quantization_config = quant
    return model


def _check_tensors(model: nn.Module, located: dict[str, Path], quant: dict, path: Path) -> dict:
    """Compare the checkpoint's names, shapes and dtypes with the model's; raise naming the first problem."""
    expected = model.state_dict()
    tied_key = None
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied_key = f"{_module_name(model, model.get_output_embeddings())}.weight"
    missing = [k for k in expected if k not in located and k != tied_key]
    if missing:
        k = missing[0]
        owner, _, suffix = k.rpartition(".")
        hint = "the checkpoint is incomplete: re-save or re-download it"
        if suffix in QUANT_SUFFIXES and f"{owner}.weight" in located:
            hint = (f"{owner} is stored unquantized (.weight): add it to quantization_config.modules_to_not_convert "
                    "in config.json")
        raise AwqNbError(f"checkpoint {path} lacks tensor {k!r} ({len(missing)} missing in "
                         f"all); {hint}.")
    unexpected = sorted(k for k in located if k not in expected)
    odd = [k for k in unexpected if k.rpartition(".")[2] in QUANT_SUFFIXES]
    if odd:
        raise AwqNbError(f"{located[odd[0]].name} holds quantized tensor {odd[0]!r} for a module that config.json says is "
                         "not quantized (modules_to_not_convert, or not a decoder Linear); fix modules_to_not_convert.")
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} checkpoint tensors the model does not use, e.g. {unexpected[:3]}")
    handles = {f: _open(f) for f in set(located.values())}
    for key, ref in expected.items():
        if key not in located:
            continue
        sl = handles[located[key]].get_slice(key)
        shape, st_dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype())
        if shape != tuple(ref.shape):
            layout = ""
            if key.rpartition(".")[2] in QUANT_SUFFIXES:
                layout = " ('gemm' layout: qweight [K, N/8], qzeros [K/g, N/8], scales [K/g, N])"
            raise AwqNbError(f"{located[key].name}: tensor {key!r} has shape {list(shape)}, expected {list(ref.shape)} "
                             f"for group_size={quant['group_size']}{layout}; config.json and the tensors disagree: "
                             "re-export the checkpoint.")
        want_int = ref.dtype == torch.int32
        if st_dtype is None or (want_int and st_dtype != torch.int32) or (not want_int and ref.is_floating_point()
                                                                          and not st_dtype.is_floating_point):
            raise AwqNbError(f"{located[key].name}: tensor {key!r} has dtype {sl.get_dtype()}, expected "
                             f"{'I32 (packed int4)' if want_int else 'a float type'}; re-export the checkpoint "
                             "without casting it.")
    return expected


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                   verify: bool = True, progress: Progress | None = None):
    """Load an AWQ "gemm" checkpoint (ours or AutoAWQ's) as ``(model, tokenizer)``.

    Floating-point tensors (and the scales) are cast to ``dtype``; the packed ints stay int32
    (fp16 scales are exact in fp32, rounded again in bf16). The tokenizer is None when the folder
    has no tokenizer files. Raises :class:`AwqNbError` naming the
    file or tensor at fault for inconsistent or corrupt checkpoints.

    ``verify``: check every tensor against the sha256 that ``save_quantized`` recorded in its
    file's metadata (a flipped byte in a qweight would otherwise load silently and only move the
    perplexity a little). Checkpoints written by other tools carry no checksums: they load with
    a one-line note. ``progress(done, total, desc)`` hears of every file (default: nothing shown).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise AwqNbError(f"{path} is not a folder; pass the checkpoint folder written by save_quantized.")
    quant = read_quant_config(path)
    located = _tensor_files(path)
    model = _build_empty(path, quant, dtype)
    expected = _check_tensors(model, located, quant, path)
    device = torch.device(device)
    unverified = []
    progress = progress or silent
    files = sorted(set(located[k] for k in expected if k in located))
    for n_done, file in enumerate(files):
        progress(n_done, len(files), f"reading {file.name}" + (" (verifying checksums)" if verify else ""))
        f = _open(file)
        digests = _recorded_digests(f, file) if verify else {}
        if verify and not digests:
            unverified.append(file.name)
        state = {}
        for key in f.keys():
            if key not in expected:
                continue
            try:
                t = f.get_tensor(key)
            except SafetensorError as e:
                raise AwqNbError(f"{file.name}: cannot read tensor {key!r} ({e}); the file is corrupt: "
                                 "fetch it again.") from None
            if key in digests and tensor_digest(t) != digests[key]:
                raise AwqNbError(f"{file.name}: tensor {key!r} does not match the checksum recorded when it was saved; "
                                 "the file is corrupt: fetch or save it again (verify=False loads it anyway).")
            state[key] = (t.to(dtype) if t.is_floating_point() else t).to(device)
        model.load_state_dict(state, strict=False, assign=True)
    progress(len(files), len(files), f"read {len(files)} file(s)")
    if unverified:
        warnings.warn(f"{path}: no checksums in {', '.join(unverified[:3])} (written by another tool): loaded unverified.",
                      stacklevel=2)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise AwqNbError(f"{path}: no tensor was loaded for {left[:3]}; the checkpoint does not match config.json.")
    model.to(device).eval()
    if device.type == "cuda":
        prepare_native(model)  # repack once, on the GPU, for the Triton kernels (kernels/native.py)
    tokenizer = None
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tokenizer
