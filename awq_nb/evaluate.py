"""How much quantization cost: perplexity, KL divergence to the original, a greedy sample, decoding speed, size."""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .arch import find_quantizable, weight_nk
from .data import eval_windows
from .errors import AwqNbError
from .models import check_seqlen
from .progress import Progress, silent
from .settings import FULL


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(_device(model)), use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer=None, data=FULL.eval_data, seqlen: int = FULL.eval_seqlen, max_windows: int | None = None,
               windows: torch.Tensor | None = None, batch_size: int = 1, progress: Progress | None = None) -> dict:
    """Perplexity over consecutive non-overlapping windows of ``seqlen`` tokens.

    Each window is scored from its second token (no context carried across windows), the usual
    protocol of the AWQ/GPTQ papers. ``windows`` (``[n, seqlen]``) overrides ``data``.
    ``progress(done, total, desc)`` hears of every window (default: nothing shown).
    Returns ``{"perplexity", "windows", "tokens", "nll"}``.
    """
    if windows is None:
        windows = eval_windows(tokenizer, data, seqlen=seqlen, max_windows=max_windows)
    check_seqlen(model, windows.shape[1])
    nll, count = 0.0, 0
    progress = progress or silent
    n = windows.shape[0]
    for i in range(0, n, batch_size):
        progress(i, n, f"window {i + 1}/{n}")
        ids = windows[i : i + batch_size]
        logits = _logits(model, ids)[:, :-1]
        target = ids[:, 1:].to(logits.device)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    progress(n, n, f"{n} windows of {windows.shape[1]} tokens")
    mean = nll / count
    if not math.isfinite(mean):
        raise AwqNbError(f"the model's loss is {mean} (non-finite logits): its weights hold NaN/inf or overflow in "
                         "this dtype; check the checkpoint (load_quantized verifies its checksums) or use float32.")
    return {"perplexity": math.exp(mean), "windows": int(windows.shape[0]), "tokens": count, "nll": mean}


@torch.no_grad()
def kl_divergence(reference: nn.Module, model: nn.Module, windows: torch.Tensor) -> dict:
    """Mean KL(reference || model) of the next-token distributions over ``windows [n, T]``, in nats,
    plus the top-1 agreement of the two models."""
    kl, agree, count = 0.0, 0, 0
    for ids in windows.split(1):
        p = F.log_softmax(_logits(reference, ids), -1)
        q = F.log_softmax(_logits(model, ids).to(p.device), -1)
        kl += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += ids.numel()
    return {"kl": kl / count, "top1_agreement": agree / count, "tokens": count}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """A greedy continuation of ``prompt`` (deterministic, for side-by-side comparison)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_device(model))
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


DECODE_PROMPT = "The State of the Union is"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, tokenizer, prompt: str = DECODE_PROMPT, new_tokens: int = 16,
                        warmup_tokens: int = 2) -> float:
    """Greedy decoding speed at batch 1 with the KV cache on, the regime where 4-bit weights should
    pay off: one warm-up ``generate`` of ``warmup_tokens`` (Triton compiles its kernels on a GPU),
    then ``new_tokens`` divided by the wall time of a ``generate`` of exactly that many new tokens
    (``min_new_tokens``: an early EOS cannot shorten the timed run)."""
    device = _device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    settings = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.generate(ids, max_new_tokens=warmup_tokens, **settings)
    _synchronize(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    _synchronize(device)
    return new_tokens / (time.perf_counter() - start)


def awq_linear_bytes(n_out: int, k: int, w_bit: int, group_size: int = 128, zero_point: bool = True) -> int:
    """Bytes of one Linear weight ``[n_out, k]`` in the AWQ format: packed ``w_bit`` codes plus an fp16
    scale (and a packed ``w_bit`` zero) per group of ``group_size`` inputs (-1: one group per row)."""
    groups = n_out * (k // group_size if group_size > 0 else 1)
    return math.ceil(n_out * k * w_bit / 8) + groups * 2 + (math.ceil(groups * w_bit / 8) if zero_point else 0)


def model_size_bytes(model: nn.Module, w_bit: int | None = None, group_size: int = 128, zero_point: bool = True,
                     keep: tuple = (), linear_bytes: Callable[[int, int], int] | None = None) -> int:
    """Bytes to store the model's parameters; with ``w_bit``, decoder Linears count as packed
    ``w_bit`` weights plus an fp16 scale (and a packed zero) per group (:func:`awq_linear_bytes`),
    the rest at its own dtype. ``linear_bytes(n_out, k)`` instead gives the bytes of one quantized
    decoder Linear in another format (e.g. :func:`awq_nb.nf4.linear_bytes`). Linears named in
    ``keep`` (full names) stay at their dtype. Tied weights are counted once."""
    if linear_bytes is None and w_bit is not None:
        linear_bytes = partial(awq_linear_bytes, w_bit=w_bit, group_size=group_size, zero_point=zero_point)
    quant = {} if linear_bytes is None else {id(weight_nk(m).untyped_storage()): m
                                             for n, m in find_quantizable(model).items() if n not in keep}
    seen, total = set(), 0
    for p in model.parameters():
        key = id(p.untyped_storage())
        if key in seen:
            continue
        seen.add(key)
        if key in quant:
            total += linear_bytes(*weight_nk(quant[key]).shape)
        else:
            total += p.numel() * p.element_size()
    return total
