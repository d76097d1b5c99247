"""One fp forward through a decoder block, with hooks that gather what both searches need.

Per Linear: mean |x| and max |x| per input channel (saliency, over all tokens) and, for the
Linears whose clipping is searched, the Gram matrix ``X^T X`` over all tokens (``full_gram``) or
only its diagonal ``g x g`` blocks. For the first ``record_n`` sequences: each Linear's full Gram matrix (the single-Linear
scale search and the per-layer error report need nothing else of its input) and each inspected
module's call arguments and output, replayed later by the scale search.

A full Gram matrix is kept in whichever form is smaller: summed into a ``[K, K]`` matrix, or,
when the block sees fewer tokens than the Linear has input channels (a small calibration budget
on a wide model), as the input rows themselves (:class:`awq_nb.search.RowGram`, ``[T, K]``). For
a 2048/5632-wide block and 512 tokens that is 24 MB of rows instead of 177 MB of matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .capture import first_tensor, map_tensors
from .errors import AwqNbError
from .results import ChannelStats
from .search import RowGram, gram, gram_diag_blocks


@dataclass
class BlockTrace:
    stats: dict[str, ChannelStats] = field(default_factory=dict)
    grams: dict[str, torch.Tensor | RowGram] = field(default_factory=dict)  # name -> [K, K] or RowGram (full_gram), or [G, g, g]
    sigmas: dict[str, torch.Tensor | RowGram] = field(default_factory=dict)  # name -> X^T X over the recorded sequences
    recorded_tokens: dict[str, int] = field(default_factory=dict)  # name -> rows of X in its sigma
    calls: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)  # inspect name -> (args, kwargs)
    # inspect name -> (output, its _version when recorded) per recorded call
    targets: dict[str, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    output: torch.Tensor | None = None


@torch.no_grad()
def trace_block(
    block: nn.Module,
    linears: dict[str, nn.Module],
    inspect: dict[str, nn.Module],
    hidden: torch.Tensor,
    args: tuple,
    kwargs: dict,
    chunk: int,
    record_n: int,
    gram_for: set[str],
    group_size: int,
    full_gram: bool = False,
) -> BlockTrace:
    """Run ``block`` over ``hidden [n, T, H]`` (in chunks) and gather a :class:`BlockTrace`.

    ``hidden`` is overwritten with the block's output (``tr.output`` is the same tensor); recorded
    tensors that would alias it are cloned first.

    Memory: Linears that read one input (q/k/v, gate/up) share one Gram accumulator, summed into
    in place (``addmm_``, no per-chunk copy); when every sequence is recorded the full ``grams`` and
    the ``sigmas`` are the same sums, so they are the same tensors. A block's largest Gram matrix
    (the down projection's ``[I, I]``) is then held once, not four times. An input wider than the
    number of tokens keeps its rows instead (module docstring): one ``[T, K]`` copy per input,
    the recorded sequences first, so a Linear's ``sigmas`` entry is a view of the first rows."""
    tr = BlockTrace()
    hidden_storage = hidden.untyped_storage().data_ptr()

    def owned(x):
        """``x`` with every tensor that views ``hidden`` (overwritten chunk by chunk below) cloned."""
        return map_tensors(x, lambda t: t.clone() if t.untyped_storage().data_ptr() == hidden_storage else t)

    sums: dict[str, torch.Tensor] = {}
    maxs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    recording = {"on": False}
    per_call_cache: dict[tuple, object] = {}  # q/k/v and gate/up share one input tensor

    n_seq = hidden.shape[0]
    one_sum = full_gram and record_n >= n_seq  # grams and sigmas sum X^T X over the same tokens
    tokens = hidden.shape[0] * hidden.shape[1]
    rows: dict[str, list[torch.Tensor]] = {}  # name -> its input's rows, chunk by chunk (shared per input)

    def add_rows(name: str, cached: dict) -> None:
        """Keep this chunk's input rows for ``name``: once per input, however many Linears read it."""
        acc = rows.get(name)
        if acc is None:
            acc = cached.setdefault("rows", [])
            rows[name] = acc
        if cached.get("rows") is not acc:
            cached["rows"] = acc
        if cached.get("rows_added") is not acc:
            xf = cached["xf"]
            acc.append(xf.clone() if xf.data_ptr() == cached["x"].data_ptr() else xf)  # the block may edit x later
            cached["rows_added"] = acc

    def add_gram(store: dict, name: str, cached: dict, key: str) -> None:
        """Add this chunk's ``X^T X`` into ``store[name]``: once per input, however many Linears read it."""
        acc = store.get(name)
        if acc is None:  # the first chunk: share the accumulator another Linear of this input opened
            acc = cached.get(key)
            if acc is None:  # X^T X of this chunk is computed once; a second store opening on it copies it
                acc = cached["xtx"].clone() if "xtx" in cached else gram(cached["xf"])
                cached.setdefault("xtx", acc)
                cached[key] = acc
            store[name] = acc
        elif cached.get(key) is not acc:
            acc.addmm_(cached["xf"].T, cached["xf"])
            cached[key] = acc

    def linear_hook(name):
        def hook(_m, inp):
            x = inp[0]
            key = (x.data_ptr(), tuple(x.shape))
            cached = per_call_cache.get(key)
            if cached is None:
                xf = x.detach().reshape(-1, x.shape[-1]).float()
                # "x" keeps the input alive until the chunk ends, so its address cannot be reused
                # by another Linear's input and hit this cache
                cached = {"sum": xf.abs().sum(0), "max": xf.abs().amax(0), "n": xf.shape[0], "x": x, "xf": xf}
                per_call_cache[key] = cached
            sums[name] = sums.get(name, 0) + cached["sum"]
            maxs[name] = torch.maximum(maxs[name], cached["max"]) if name in maxs else cached["max"]
            counts[name] = counts.get(name, 0) + cached["n"]
            as_rows = tokens < x.shape[-1]
            if name in gram_for:
                if full_gram and as_rows:
                    add_rows(name, cached)
                elif full_gram:
                    add_gram(tr.grams, name, cached, "gram")
                else:
                    if "blocks" not in cached:
                        cached["blocks"] = gram_diag_blocks(cached["xf"], group_size)
                    tr.grams[name] = tr.grams[name] + cached["blocks"] if name in tr.grams else cached["blocks"]
            if recording["on"]:
                if as_rows:
                    add_rows(name, cached)
                elif one_sum and name in gram_for:
                    tr.sigmas[name] = tr.grams[name]
                else:
                    add_gram(tr.sigmas, name, cached, "sigma")
                tr.recorded_tokens[name] = tr.recorded_tokens.get(name, 0) + cached["n"]

        return hook

    def inspect_hook(name):
        def hook(_m, a, kw):
            if recording["on"]:
                tr.calls.setdefault(name, []).append((owned(a), owned(dict(kw))))

        return hook

    def target_hook(name):
        def hook(_m, _a, _kw, out):
            if recording["on"]:
                t = owned(first_tensor(out).detach())
                tr.targets.setdefault(name, []).append((t, t._version))

        return hook

    handles = [m.register_forward_pre_hook(linear_hook(n)) for n, m in linears.items()]
    handles += [m.register_forward_pre_hook(inspect_hook(n), with_kwargs=True) for n, m in inspect.items()]
    handles += [m.register_forward_hook(target_hook(n), with_kwargs=True) for n, m in inspect.items()]
    try:
        n = hidden.shape[0]
        starts = list(range(0, min(record_n, n), chunk)) + list(range(min(record_n, n), n, chunk))
        for s in starts:
            e = min(s + chunk, record_n if s < record_n else n)
            recording["on"] = s < record_n
            per_call_cache.clear()
            # The block's output replaces its input in place: one [n, T, H] buffer for the whole
            # search instead of an input, a list of outputs and their concatenation.
            out = first_tensor(block(hidden[s:e], *args, **kwargs))
            if out.dtype != hidden.dtype:
                raise AwqNbError(f"the decoder block returned {out.dtype} for {hidden.dtype} inputs; load the model in "
                                 "one dtype (load_model(..., dtype=...)) before searching.")
            hidden[s:e] = out
    finally:
        for h in handles:
            h.remove()
        per_call_cache.clear()
    tr.output = hidden
    joined: dict[tuple[int, int], RowGram] = {}  # one RowGram per input and length, shared like the accumulators
    for name, acc in rows.items():
        g = joined.get((id(acc), -1))
        if g is None:
            g = joined[(id(acc), -1)] = RowGram(torch.cat(acc) if len(acc) > 1 else acc[0])
            acc.clear()
        if full_gram and name in gram_for:
            tr.grams[name] = g
        if name in tr.recorded_tokens:
            t = tr.recorded_tokens[name]
            if t == g.x.shape[0]:
                tr.sigmas[name] = g
            else:  # the recorded sequences came first: a view of the first rows
                tr.sigmas[name] = joined.setdefault((id(acc), t), RowGram(g.x[:t]))
    tr.stats = {
        name: ChannelStats(mean_abs=(sums[name] / counts[name]).cpu(), max_abs=maxs[name].cpu(), tokens=counts[name])
        for name in sums
    }
    return tr
