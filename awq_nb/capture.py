"""Get the inputs of the first decoder block, and run one block, without running the whole model.

Every decoder block is temporarily wrapped in a :class:`_Catcher` that records what it is called
with and hands its input straight through, so one cheap pass of the base model (embeddings and
identity blocks, no LM head) yields the block-0 hidden states and each block's keyword arguments
(attention masks, rotary embeddings, ...). No exception is thrown through the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, get_blocks


CAPTURE_CHUNK = 16  # sequences per pass of the embeddings (the final norm's output is thrown away)


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, idx: int, store: dict):
        super().__init__()
        self.layer = layer
        self.idx = idx
        self.store = store

    def __getattr__(self, name):  # models read e.g. ``decoder_layer.attention_type``
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.store.setdefault(self.idx, (hidden, args[1:], dict(kwargs)))
        return hidden


@dataclass
class BlockInputs:
    """``hidden``: block-0 input ``[n, T, H]``; ``kwargs[i]``: block ``i``'s keyword arguments,
    captured on one sequence so that every tensor broadcasts over any batch size."""

    hidden: torch.Tensor
    args: list[tuple]
    kwargs: list[dict]


def _catch(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor) -> dict:
    blocks = get_blocks(model, spec)
    originals = list(blocks)
    store: dict = {}
    try:
        for i, layer in enumerate(originals):
            blocks[i] = _Catcher(layer, i, store)
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            blocks[i] = layer
    return store


def _move_non_block_tensors(model: nn.Module, spec: ArchSpec, device) -> list:
    """Move the parameters and buffers outside the decoder blocks (embeddings, rotary tables,
    final norm) to ``device``, one tensor at a time so the blocks stay put. Returns what to undo."""
    in_blocks = {id(m) for b in get_blocks(model, spec) for m in b.modules()}
    moved = []
    for m in model.base_model.modules():
        if id(m) in in_blocks:
            continue
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None and t.device != torch.device(device):
                    moved.append((store, name, t.device))
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(device)
                    else:
                        store[name] = t.to(device)
    return moved


def _restore(moved: list) -> None:
    for store, name, home in moved:
        t = store[name]
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(home)
        else:
            store[name] = t.to(home)


def capture_inputs(model: nn.Module, spec: ArchSpec, tokens: torch.Tensor, device) -> BlockInputs:
    """Block-0 hidden states for ``tokens [n, T]`` and per-block kwargs, all on ``device``.

    Only the embedding (and whatever precedes block 0) runs on ``device``; the rest of the model
    stays where it is.
    """
    moved = _move_non_block_tensors(model, spec, device)
    try:
        one = _catch(model, spec, tokens[:1].to(device))
        hidden = None
        for start in range(0, tokens.shape[0], CAPTURE_CHUNK):  # chunks keep the pass's temporaries small
            part = _catch(model, spec, tokens[start : start + CAPTURE_CHUNK].to(device))[0][0]
            if hidden is None:
                hidden = part.new_empty((tokens.shape[0], *part.shape[1:]))
            hidden[start : start + part.shape[0]] = part
    finally:
        _restore(moved)
    n_blocks = len(get_blocks(model, spec))
    return BlockInputs(hidden, [one[i][1] for i in range(n_blocks)], [one[i][2] for i in range(n_blocks)])


def map_tensors(x, fn):
    """``x`` with ``fn`` applied to every tensor inside nested tuples/lists/dicts; the rest as is."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        return tuple(map_tensors(v, fn) for v in x)
    if isinstance(x, list):
        return [map_tensors(v, fn) for v in x]
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def cast_floats(x, dtype=None, device=None):
    """Move/cast every floating tensor inside nested tuples/lists/dicts (masks, rotary tables)."""
    def to(t):
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    return map_tensors(x, to)


def first_tensor(out):
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is one (4.x)."""
    return out[0] if isinstance(out, (tuple, list)) else out
