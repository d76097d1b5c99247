"""The AWQ loop: capture inputs -> per block: trace -> search scales -> fold -> search clips.

``search`` leaves the model untouched and returns an :class:`AWQResult`; ``apply_awq`` folds the
scales and clips into the weights (still floating point); ``fake_quantize`` rounds the weights
(quantize + dequantize); ``quantize`` does all three. One decoder block lives on the compute
device at a time, so a model larger than GPU memory still quantizes.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import nn

from .arch import (ArchSpec, block_linears, find_quantizable, fold_scales, get_blocks, get_spec, is_linear, resolve_groups,
                   swap_weight_nk, weight_nk)
from .capture import capture_inputs, cast_floats, first_tensor, map_tensors
from .config import AWQConfig
from .errors import AwqNbError
from .models import check_seqlen
from .quantizer import fitting_group_sizes, pseudo_quantize
from .results import AWQResult, ClipRecord, ScaleRecord
from .rounding import Rounded, codes_for, get_rounder, round_weight
from .memory import trim
from .progress import Progress, console_progress
from .search import RowGram, apply_clip_, clip_ratio_grid, gram_loss, search_clip, search_scales, unscale_gram_
from .settings import FULL
from .trace import BlockTrace, trace_block
from .wqlinear import WQLinear, matches_any


def tqdm_progress() -> Progress:
    """The default progress of the search: a bar on a terminal or in a notebook, plain lines in a log
    (:class:`awq_nb.progress.ConsoleProgress`)."""
    return console_progress("AWQ search", "block")


def check_not_quantized(model: nn.Module) -> None:
    """An AWQ checkpoint loaded back has WQLinear layers: quantizing it again is a mistake to name."""
    done = next((n for n, m in model.named_modules() if isinstance(m, WQLinear)), None)
    if done is not None:
        raise AwqNbError(f"the model is already AWQ-quantized ({done} is a WQLinear): quantize the original "
                         "floating-point model instead.")


def check_finite(module: nn.Module, prefix: str = "") -> None:
    """NaN/inf in any floating parameter of ``module`` (not yet on the meta device) is an error
    naming it (``prefix`` + its name)."""
    for name, t in module.named_parameters():
        if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            raise AwqNbError(f"{prefix}{name} has NaN or inf values: the checkpoint is corrupt or was saved after a "
                             "diverged step; every later result would be NaN.")


FINITE_CHUNK = 1 << 22  # elements per isfinite() call when the sum alone cannot decide


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``, without tensor-sized temporaries (``isfinite(t).all()`` allocated
    several: 0.45 GB for a 32000 x 2048 fp32 embedding). A finite sum proves it (NaN or inf
    anywhere makes the sum NaN or inf); only a sum that overflowed is checked again, chunk by chunk."""
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def check_model(model: nn.Module, config: AWQConfig) -> list[str]:
    """Validate weights and shapes before any work; returns the Linears kept in floating point.

    NaN/inf in any floating parameter (norms and embeddings included) is an error, and
    so is a model that is already AWQ-quantized; a Linear whose in_features is not a multiple of
    the group size is an error naming it and the sizes that fit, unless ``config.skip_indivisible``.
    """
    check_not_quantized(model)
    check_finite(model)
    quantizable = find_quantizable(model)
    # One rule, the one checkpoints are read with (AutoAWQ, transformers, vLLM): a pattern keeps every
    # Linear whose full name contains it. Resolved once here to full names, so that what the search
    # and fake_quantize leave in floating point is exactly what save_quantized writes unquantized.
    keep = [name for name in quantizable if matches_any(name, config.modules_to_not_convert)]
    for name, m in quantizable.items():
        if name in keep:
            continue
        k = weight_nk(m).shape[1]  # NaN/inf were checked above, with every parameter
        if config.group_size > 0 and k % config.group_size:
            if config.skip_indivisible:
                keep.append(name)
                continue
            raise AwqNbError(
                f"{name} has in_features={k}, not a multiple of group_size={config.group_size}. "
                f"Group sizes that fit: {fitting_group_sizes(k) or 'none'} (or -1, per-channel); "
                "or set skip_indivisible=True (CLI --skip-indivisible) to keep such layers in floating point."
            )
    return keep


def _kept(name: str, keep: list[str]) -> bool:
    """Whether Linear ``name`` stays floating point: the substring rule of :func:`matches_any` (full
    names from :func:`check_model` match themselves; an older result's patterns still work)."""
    return matches_any(name, keep)


def _replay_loss(inspect: nn.Module, layers: list[nn.Module], calls: list, targets: list[torch.Tensor]):
    """A loss function for :func:`search_scales` that swaps effective weights into ``layers`` and
    replays the recorded calls of ``inspect``, stopping early once the error passes ``bound``."""
    numel = sum(t.numel() for t in targets)

    def loss_fn(eff: list[torch.Tensor], bound: float = math.inf) -> tuple[float, bool]:
        saved = []
        err, done = 0.0, 0
        try:
            for m, e in zip(layers, eff):  # the candidates become the weights, no copy either way
                saved.append(swap_weight_nk(m, e))
            with torch.no_grad():
                for (a, k), t in zip(calls, targets):
                    err += float((first_tensor(inspect(*a, **k)) - t).pow(2).sum())
                    done += 1
                    if err / numel > bound:
                        break  # already loses: a lower bound is all the caller needs
        finally:
            for m, w in zip(layers, saved):
                swap_weight_nk(m, w)
        return err / numel, done == len(calls)

    return loss_fn


def _per_sequence(calls: list, targets: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
    """Split recorded calls of ``b`` sequences into ``b`` calls of one, so a pruned candidate stops
    after the sequence that proves it loses (both search modes replay the same calls, so their
    losses agree to the bit). ``b`` is the batch size of the hidden states (the first positional
    argument, or ``hidden_states``); tensors of two or more dimensions whose first is ``b`` are
    sliced (hidden states, per-sequence masks), everything else (rotary tables, shared masks, 1-D
    positions) is passed as it is."""
    def take(x, b, i):
        return map_tensors(x, lambda t: t[i : i + 1] if t.dim() >= 2 and t.shape[0] == b else t)

    out_calls, out_targets = [], []
    for (a, k), t in zip(calls, targets):
        x = a[0] if a else k.get("hidden_states")
        b = x.shape[0] if torch.is_tensor(x) and x.dim() >= 2 else 1
        if b == 1 or t.shape[0] != b:
            out_calls.append((a, k))
            out_targets.append(t)
            continue
        for i in range(b):
            out_calls.append((take(a, b, i), take(k, b, i)))
            out_targets.append(t[i : i + 1])
    return out_calls, out_targets


def _search_block(
    idx: int,
    block: nn.Module,
    spec: ArchSpec,
    tr: BlockTrace,
    config: AWQConfig,
    prefix: str,
    keep: list[str],
    hints: dict,
    in_place: bool = False,
) -> tuple[list[ScaleRecord], list[ClipRecord], dict, dict[str, Rounded], bool]:
    """Scale and clip search of one block (on the block's device), then the codes of a rounding
    method that needs the Gram matrices (:mod:`awq_nb.rounding`). ``hints`` maps a scaling group
    (prev, inspect) to its best alpha in the previous block; updated here.

    The search works on an fp32 copy of the block, or, with ``in_place`` and an fp32 block, on the
    block itself, which then leaves with the scales folded and the clips applied (what
    :func:`apply_block` would do, to the bit) and without a second copy of its weights in memory.
    Returns the records, the per-Linear errors, the codes, and whether the block was changed.

    Memory: the trace's Gram matrices are turned into those of the scaled input in place, once per
    shared accumulator, after the scale search has used them; each Linear is then clipped,
    rounded and measured in turn, holding one copy of its unclipped weight at a time."""
    in_place = in_place and all(p.dtype == torch.float32 for p in block.parameters())
    work = block if in_place else copy.deepcopy(block).float()
    linears = block_linears(work)
    names = {id(m): n for n, m in linears.items()}
    todo = {n: m for n, m in linears.items() if not _kept(f"{prefix}.{n}", keep)}
    errors: dict[str, dict[str, float]] = {}
    for n, m in todo.items():  # plain RTN's error, on the weights as they are before AWQ
        if n in tr.sigmas:
            w0 = weight_nk(m)
            rtn = pseudo_quantize(w0, config.w_bit, config.group_size, config.zero_point)
            errors[f"{prefix}.{n}"] = {"rtn": gram_loss(rtn.sub_(w0), tr.sigmas[n]) / (tr.recorded_tokens[n] * w0.shape[0])}
            del rtn  # not kept through the search below (the last one is the size of the largest weight)
    groups = resolve_groups(work, spec)
    # effective-weight bookkeeping for per-layer error: W' = diag(1/out) W diag(in)
    in_scale: dict[str, torch.Tensor] = {}
    out_scale: dict[str, torch.Tensor] = {}
    scale_recs = []
    searched = []
    for rg in groups:
        lnames = [names[id(m)] for m in rg.layers]
        if any(n not in todo for n in lnames):
            continue
        x_mean = tr.stats[lnames[0]].mean_abs.to(weight_nk(rg.layers[0]).device)
        weights = [weight_nk(m) for m in rg.layers]
        if len(rg.layers) == 1 and rg.inspect is rg.layers[0]:
            sigma = tr.sigmas[lnames[0]]
            w0 = weights[0]
            numel = tr.recorded_tokens[lnames[0]] * w0.shape[0]
            loss_fn = lambda eff, bound=math.inf, sigma=sigma, w0=w0, numel=numel: (gram_loss(eff[0] - w0, sigma) / numel, True)  # noqa: E731
        else:
            calls = [cast_floats(c, torch.float32) for c in tr.calls[rg.group.inspect]]
            traced = tr.targets.get(rg.group.inspect, [])
            if len(traced) == len(calls) and all(t.dtype == torch.float32 and t._version == v for t, v in traced):
                targets = [t for t, _ in traced]
            else:  # not fp32, or the block edited its module's output in place: recompute them
                with torch.no_grad():
                    targets = [first_tensor(rg.inspect(*a, **k)) for a, k in calls]
            calls, targets = _per_sequence(calls, targets)
            loss_fn = _replay_loss(rg.inspect, rg.layers, calls, targets)
        hint = (rg.group.prev, rg.group.inspect)
        alphas, losses, best_a, s, pruned = search_scales(
            x_mean, weights, loss_fn, config.w_bit, config.group_size, config.zero_point, config.n_grid, config.duo_scaling,
            prune=config.prune_grid, first_alpha=hints.get(hint, 0.5),
        )
        hints[hint] = best_a
        scale_recs.append(ScaleRecord(idx, rg.group.prev, list(rg.group.layers), rg.group.inspect, alphas, losses, best_a, s,
                                      pruned))
        searched.append((rg, s))
    tr.calls.clear()  # the replays are done: free the recorded activations before clipping
    tr.targets.clear()
    for rg, s in searched:  # fold after all searches, as each group was searched on the unscaled block
        fold_scales(work, rg, s.to(weight_nk(rg.layers[0]).device), spec)
        for m in rg.layers:
            in_scale[names[id(m)]] = s
        if is_linear(rg.prev):
            pn = names[id(rg.prev)]
            full = out_scale.get(pn, torch.ones(weight_nk(rg.prev).shape[0]))
            rows = slice(None)
            if rg.group.prev_chunk is not None:
                i, n = rg.group.prev_chunk
                size = full.shape[0] // n
                rows = slice(i * size, (i + 1) * size)
            full = full.clone()
            full[rows] = full[rows] * s
            out_scale[pn] = full

    unscaled: set[int] = set()

    def scaled_input(sig, n: str):
        """``sig``, turned in place (once per storage: accumulators and rows are shared) into the
        Gram of the scaled input."""
        key = (sig.x if isinstance(sig, RowGram) else sig).untyped_storage().data_ptr()
        if n in in_scale and key not in unscaled:
            unscale_gram_(sig, in_scale[n].to(sig.device))
            unscaled.add(key)
        return sig

    clip_recs, rounded = [], {}
    ratios = clip_ratio_grid(config.clip_grid, config.max_shrink)
    needs_gram = get_rounder(config.rounding).needs_gram
    factors: dict = {}  # what the rounding derives from a Gram matrix, shared by the Linears that share it
    for n, m in todo.items():
        w = weight_nk(m)
        sig = scaled_input(tr.sigmas[n], n) if n in tr.sigmas else None
        unclipped = w.clone() if sig is not None or needs_gram else None
        if config.clip and n not in spec.skip_clip and n in tr.grams:
            found = search_clip(w, scaled_input(tr.grams[n], n), config.w_bit, config.group_size, config.zero_point,
                                ratios, config.clip_chunk, asym=config.asym_clip, sweeps=config.clip_sweeps)
            apply_clip_(w, found.max_val, config.group_size, found.min_val)
            clip_recs.append(ClipRecord(idx, n, ratio_grid=ratios, **found._asdict()))
        q_rtn = pseudo_quantize(w, config.w_bit, config.group_size, config.zero_point) if sig is not None else None
        if needs_gram:  # the trace kept this Linear's full X^T X over all tokens
            r = round_weight(config.rounding, w, config.w_bit, config.group_size, config.zero_point,
                             gram=scaled_input(tr.grams[n], n), target=unclipped, factors=factors)
            rounded[f"{prefix}.{n}"] = r.to("cpu")
        if sig is None:
            continue
        rows = out_scale[n].to(w.device)[:, None] if n in out_scale else 1.0
        numel = tr.recorded_tokens[n] * w.shape[0]
        # the output error of the effective weight, in the scaled input's terms: (Q(W') - W') / out
        errs = errors[f"{prefix}.{n}"]
        errs["awq"] = gram_loss(q_rtn.sub_(unclipped).mul_(rows), sig) / numel  # in place: no weight-sized temporaries
        del q_rtn
        if needs_gram:  # "awq": the final rounding; "awq_rtn": the same scales and clips, rounded to nearest
            errs["awq_rtn"] = errs["awq"]
            errs["awq"] = gram_loss(r.dequantize().to(w.device).sub_(unclipped).mul_(rows), sig) / numel
        del unclipped
    return scale_recs, clip_recs, errors, rounded, in_place


@torch.no_grad()
def _forward_quantized(block: nn.Module, idx: int, spec: ArchSpec, result: AWQResult, config: AWQConfig, prefix: str,
                       keep: list[str], hidden: torch.Tensor, args: tuple, kwargs: dict, applied: bool) -> torch.Tensor:
    """``hidden`` (block ``idx``'s input ``[n, T, H]``) overwritten, chunk by chunk, with the output of
    a copy of the block quantized as the search decided: scales folded and clips applied (already, if
    ``applied``), every quantized Linear's weight replaced by its codes dequantized. The block itself
    is left as it is."""
    qblock = copy.deepcopy(block)
    if not applied:
        apply_block(qblock, idx, spec, result)
    for n, m in block_linears(qblock).items():
        if not _kept(f"{prefix}.{n}", keep):
            w = weight_nk(m)
            w.copy_(codes_for(f"{prefix}.{n}", w, config, result.rounded).dequantize(w.dtype))
    for s in range(0, hidden.shape[0], config.block_chunk):
        hidden[s : s + config.block_chunk] = first_tensor(qblock(hidden[s : s + config.block_chunk], *args, **kwargs))
    return hidden


def _resolve_calib(tokenizer, calib, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype != torch.long:
            raise AwqNbError(f"calibration tensor must be LongTensor [n_samples, seqlen], got {calib.dtype} {tuple(calib.shape)}.")
        return calib
    if tokenizer is None:
        raise AwqNbError("pass a tokenizer to use a text calibration source, or give token blocks [n, seqlen].")
    from .data import calibration_blocks

    return calibration_blocks(tokenizer, calib, n_samples=n_samples, seqlen=seqlen, seed=seed)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def search(
    model: nn.Module,
    calib: torch.Tensor,
    config: AWQConfig,
    progress: Progress | None = None,
    device=None,
    tokenizer=None,
    n_samples: int = FULL.n_samples,
    seqlen: int = FULL.seqlen,
    seed: int = FULL.seed,
    apply: bool = False,
) -> AWQResult:
    """Run the AWQ scale and clipping searches; the model is left unchanged unless ``apply``.

    ``calib``: token blocks ``LongTensor [n, T]`` or a text source (with ``tokenizer``, see
    :mod:`awq_nb.data`). ``device``: where each block is computed (default: the model's device).
    ``apply=True``: the scales and clips are applied as each block is done (the model ends as
    :func:`apply_awq` would leave it, to the bit), and an fp32 block is searched in place instead of
    on a copy: one block's weights less in memory.
    """
    result = None
    for result, _ in search_blocks(model, calib, config, progress, device, tokenizer, n_samples, seqlen, seed,
                                   in_place=apply):
        pass
    return result


def search_blocks(model: nn.Module, calib, config: AWQConfig, progress: Progress | None = None, device=None,
                  tokenizer=None, n_samples: int = FULL.n_samples, seqlen: int = FULL.seqlen, seed: int = FULL.seed,
                  before_block: Callable[[int, nn.Module], None] | None = None, in_place: bool = False):
    """:func:`search`, one decoder block at a time: yields ``(result so far, i)`` after block ``i``
    is searched and back on its own device, so a caller can pack and free it before the next one (the
    streaming path, awq_nb/streaming.py). ``before_block(i, block)`` runs before block ``i`` is
    touched (e.g. to read its weights from disk). The last ``result`` is :func:`search`'s.

    ``in_place``: each block is yielded with its scales and clips applied (as by
    :func:`apply_block`); an fp32 block is searched in place, without an fp32 copy of its weights."""
    t0 = time.perf_counter()
    spec = get_spec(model)
    keep = check_model(model, config)
    tokens = _resolve_calib(tokenizer, calib, n_samples, seqlen, seed)
    check_seqlen(model, tokens.shape[1], "calibration seqlen")
    device = torch.device(device) if device is not None else _model_device(model)
    progress = progress or tqdm_progress()
    result = AWQResult(config=config.to_dict(), model_name=getattr(model.config, "_name_or_path", ""))
    result.config["modules_to_not_convert"] = keep
    was_training = model.training
    model.eval()
    blocks = get_blocks(model, spec)
    needs_gram = get_rounder(config.rounding).needs_gram
    home, block = None, None
    try:
        progress(0, len(blocks), f"capturing the inputs of block 0 ({tokens.shape[0]} x {tokens.shape[1]} tokens)")
        inp = capture_inputs(model, spec, tokens, device)
        hidden = inp.hidden
        trim()  # the capture's temporaries (awq_nb/memory.py)
        hints: dict = {}
        for i, block in enumerate(blocks):
            progress(i, len(blocks), f"searching block {i + 1}/{len(blocks)}")
            if before_block is not None:
                before_block(i, block)
            home = next(block.parameters()).device
            block.to(device)
            prefix = f"{spec.blocks}.{i}"
            linears = block_linears(block)
            inspect = {rg.group.inspect: rg.inspect for rg in resolve_groups(block, spec) if not is_linear(rg.inspect)}
            gram_for = {n for n in linears if not _kept(f"{prefix}.{n}", keep)
                        and (needs_gram or (config.clip and n not in spec.skip_clip))}
            args, kwargs = cast_floats(inp.args[i], device=device), cast_floats(inp.kwargs[i], device=device)
            block_input = hidden.clone() if config.propagate == "quantized" else None  # the trace overwrites hidden
            tr = trace_block(block, linears, inspect, hidden, args, kwargs, config.block_chunk, config.search_samples,
                             gram_for, config.group_size, full_gram=config.clip_sweeps > 0 or needs_gram)
            trim()  # the forward's temporaries, before the search allocates its own
            scales, clips, errors, rounded, changed = _search_block(i, block, spec, tr, config, prefix, keep, hints, in_place)
            result.scales += scales
            result.clips += clips
            result.layer_errors.update(errors)
            result.rounded.update(rounded)
            if in_place and not changed:  # a block that is not fp32 was searched on a copy
                apply_block(block, i, spec, result)
            result.saliency.update({f"{prefix}.{n}": st for n, st in tr.stats.items()})
            hidden = tr.output
            if block_input is not None:  # the next block sees what the quantized model will give it
                hidden = tr.output = None  # the fp output is not needed: free it first
                hidden = _forward_quantized(block, i, spec, result, config, prefix, keep, block_input, args, kwargs,
                                            applied=in_place)
                block_input = None
            del tr
            trim()
            block.to(home)
            home = None
            if i + 1 == len(blocks):
                progress(len(blocks), len(blocks), f"searched {len(blocks)} blocks in {time.perf_counter() - t0:.0f} s")
                result.seconds = time.perf_counter() - t0
            yield result, i
    finally:  # an error (or Ctrl-C) mid-loop leaves no block on the compute device and the mode as it was
        if home is not None and block is not None:
            block.to(home)
        model.train(was_training)


@torch.no_grad()
def apply_awq(model: nn.Module, result: AWQResult) -> nn.Module:
    """Fold the searched scales and clip the weights, in place (the model stays floating point)."""
    spec = get_spec(model)
    for i, block in enumerate(get_blocks(model, spec)):
        apply_block(block, i, spec, result)
    return model


@torch.no_grad()
def apply_block(block: nn.Module, idx: int, spec: ArchSpec, result: AWQResult) -> None:
    """:func:`apply_awq` for decoder block ``idx`` alone: its scales folded, then its clips applied
    (every scaling group and clip of a block lives inside that block)."""
    for rec in (r for r in result.scales if r.block == idx):
        rg = next((g for g in resolve_groups(block, spec) if g.group.prev == rec.prev and list(g.group.layers) == rec.layers), None)
        if rg is None:
            raise AwqNbError(f"block {rec.block} has no scaling group {rec.prev} -> {rec.layers}: the result belongs to another architecture.")
        fold_scales(block, rg, rec.scales, spec)
    gs = result.config["group_size"]
    for rec in (r for r in result.clips if r.block == idx):
        apply_clip_(weight_nk(block.get_submodule(rec.layer)), rec.max_val, gs, rec.min_val)


@torch.no_grad()
def fake_quantize(model: nn.Module, config: AWQConfig, keep: list[str] | None = None,
                  rounded: dict[str, Rounded] | None = None) -> nn.Module:
    """Replace every decoder Linear's weight by its quantized value (codes dequantized) in place.

    The codes are ``rounded[name]`` (``AWQResult.rounded``: what the search computed for a rounding
    method that needs the Gram matrices, e.g. ``rounding="gptq"``), else ``config.rounding``
    applied now (:func:`awq_nb.rounding.codes_for`). On the untouched model with
    ``rounding="rtn"`` this is round-to-nearest (RTN); after :func:`apply_awq` it is AWQ.
    """
    keep = check_model(model, config) if keep is None else keep
    for name, m in find_quantizable(model).items():
        if _kept(name, keep):
            continue
        w = weight_nk(m)
        w.copy_(codes_for(name, w, config, rounded).dequantize(w.dtype))
    return model


def quantize(
    model: nn.Module,
    tokenizer,
    config: AWQConfig | None = None,
    calib=FULL.calib,
    n_samples: int = FULL.n_samples,
    seqlen: int = FULL.seqlen,
    seed: int = FULL.seed,
    progress: Progress | None = None,
    device=None,
) -> AWQResult:
    """Search, apply and fake-quantize in one call; returns the search results for plots."""
    config = config or AWQConfig()
    result = search(model, calib, config, progress=progress, device=device, tokenizer=tokenizer, n_samples=n_samples,
                    seqlen=seqlen, seed=seed, apply=True)
    fake_quantize(model, config, keep=result.config["modules_to_not_convert"], rounded=result.rounded)
    return result
