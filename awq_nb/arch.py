"""Architectures as data: which Linears share an input scale, and which op absorbs it.

AWQ multiplies the input channels of some Linears by ``s`` and divides the op that produces
that input (a norm, or the previous Linear's output rows) by ``s``; in exact arithmetic the
model computes the same function. Each family is one :class:`ArchSpec` in :data:`REGISTRY`,
keyed by the Hugging Face class name; adding a family means adding an entry (and a test in
tests/test_arch.py, which proves the folding is exact for every entry).

Names are relative to one decoder block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import AwqNbError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears ``layers`` whose inputs come from ``prev``; ``inspect`` is the module whose
    output the scale search compares (the smallest module holding all of ``layers``).

    ``prev_chunk=(i, n)``: only rows chunk ``i`` of ``n`` of ``prev``'s output feed ``layers``
    (fused gate_up / qkv projections). Groups whose shapes do not fit are skipped at run time
    (e.g. v_proj -> o_proj under grouped-query attention).
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str
    prev_chunk: tuple[int, int] | None = None


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # path of the decoder-block ModuleList from the top model
    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0  # Gemma-style RMSNorm computes x * (offset + weight)
    skip_clip: tuple[str, ...] = ()  # Linears whose clipping search is skipped (q/k: attention logits)


def _llama_like(mlp_prev: str = "post_attention_layernorm", norm_offset: float = 0.0) -> ArchSpec:
    return ArchSpec(
        blocks="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
            ScaleGroup(mlp_prev, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ),
        norm_offset=norm_offset,
        skip_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )


_LLAMA = _llama_like()
REGISTRY: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,  # also SmolLM2
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,  # q_norm/k_norm act after the projections: scaling inputs is unaffected
    # Gemma3: RMSNorm multiplies by (1 + weight); sandwich norms around attention and MLP.
    "Gemma3ForCausalLM": _llama_like("pre_feedforward_layernorm", norm_offset=1.0),
    # OPT: pre-LayerNorm OPT only (do_layer_norm_before=True).
    "OPTForCausalLM": ArchSpec(
        blocks="model.decoder.layers",
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),  # ReLU is positively homogeneous: exact
        ),
        skip_clip=("self_attn.q_proj", "self_attn.k_proj"),
    ),
    # GPT-2: Conv1D stores weight as [in, out]; GELU between c_fc and c_proj is not homogeneous.
    "GPT2LMHeadModel": ArchSpec(
        blocks="transformer.h",
        groups=(
            ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
            ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
        ),
    ),
    "GPTNeoXForCausalLM": ArchSpec(
        blocks="gpt_neox.layers",
        groups=(
            ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
            ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
        ),
    ),
    # Phi-3: fused qkv and gate_up; v is the last third of qkv when kv heads == heads.
    "Phi3ForCausalLM": ArchSpec(
        blocks="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_chunk=(2, 3)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_chunk=(1, 2)),
        ),
    ),
}


def get_spec(model: nn.Module) -> ArchSpec:
    """The registry entry for ``model`` (by its class name), or a clear error saying how to add one."""
    name = type(model).__name__
    if name not in REGISTRY:
        raise AwqNbError(
            f"architecture {name!r} is not registered in awq_nb.arch.REGISTRY "
            f"(known: {', '.join(sorted(REGISTRY))}). Add an ArchSpec entry naming its decoder blocks and "
            "scale groups (see the Llama entry and docs/architectures.md), plus a test in tests/test_arch.py."
        )
    spec = REGISTRY[name]
    if name == "OPTForCausalLM" and not getattr(model.config, "do_layer_norm_before", True):
        raise AwqNbError("OPT with do_layer_norm_before=False (post-LayerNorm, e.g. opt-350m) cannot fold scales into its norms.")
    return spec


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or get_spec(model)
    return model.get_submodule(spec.blocks)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def weight_nk(m: nn.Module) -> torch.Tensor:
    """The weight of a Linear or a GPT-2 Conv1D as an ``[N, K]`` (out, in) view, writable in place."""
    if isinstance(m, nn.Linear):
        return m.weight.data
    if type(m).__name__ == "Conv1D":
        return m.weight.data.t()
    raise AwqNbError(f"{type(m).__name__} is not a Linear or Conv1D")


def set_weight_nk(m: nn.Module, w: torch.Tensor) -> None:
    weight_nk(m).copy_(w)


def swap_weight_nk(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Make ``w [N, K]`` the weight of ``m`` without copying it; returns the weight it replaced, as
    ``[N, K]`` (swap it back to restore)."""
    old = weight_nk(m)
    m.weight.data = w if isinstance(m, nn.Linear) else w.t()
    return old


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All quantizable Linears (nn.Linear and GPT-2 Conv1D) inside one decoder block, by relative name."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def find_quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear inside the decoder blocks, by full name (``model.layers.0.self_attn.q_proj``).

    Embeddings and ``lm_head`` are never in this list: they stay in floating point.
    """
    spec = get_spec(model)
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for name, m in block_linears(block).items():
            out[f"{spec.blocks}.{i}.{name}"] = m
    return out


@dataclass
class ResolvedGroup:
    """A :class:`ScaleGroup` bound to the modules of one block, with shapes checked."""

    group: ScaleGroup
    prev: nn.Module
    layers: list[nn.Module]
    inspect: nn.Module
    in_features: int


def resolve_groups(block: nn.Module, spec: ArchSpec) -> list[ResolvedGroup]:
    """Bind the spec's groups to ``block``; groups whose shapes do not fit are dropped."""
    out = []
    for g in spec.groups:
        prev = block.get_submodule(g.prev)
        layers = [block.get_submodule(n) for n in g.layers]
        k = weight_nk(layers[0]).shape[1]
        if any(weight_nk(m).shape[1] != k for m in layers):
            continue
        if is_linear(prev):
            rows = weight_nk(prev).shape[0]
            if g.prev_chunk is not None:
                i, n = g.prev_chunk
                if rows % n:
                    continue
                rows //= n
            if rows != k:  # e.g. v_proj (kv heads) -> o_proj (all heads) under GQA
                continue
        elif prev.weight.shape[-1] != k:
            continue
        out.append(ResolvedGroup(g, prev, layers, block.get_submodule(g.inspect), k))
    return out


@torch.no_grad()
def fold_scales(block: nn.Module, rg: ResolvedGroup, scales: torch.Tensor, spec: ArchSpec) -> None:
    """Apply ``scales [K]`` to one group in place: layers' input channels times ``s``, ``prev`` divided by ``s``.

    Exact in real arithmetic for every registered family: norms (with bias, and with Gemma's
    ``1 + weight``), and Linears feeding the group directly or through a homogeneous or gating op.
    """
    s = scales.detach().float()
    if not torch.all(torch.isfinite(s)) or not torch.all(s > 0):
        raise AwqNbError(f"scales for {rg.group.prev} -> {rg.group.layers} must be finite and positive")
    prev = rg.prev
    if is_linear(prev):
        w = weight_nk(prev)
        rows = slice(None)
        if rg.group.prev_chunk is not None:
            i, n = rg.group.prev_chunk
            size = w.shape[0] // n
            rows = slice(i * size, (i + 1) * size)
        sd = s.to(w.device)
        w[rows].copy_((w[rows].float() / sd[:, None]).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            b = prev.bias.data
            b[rows].copy_((b[rows].float() / sd).to(b.dtype))
    else:  # a norm: effective weight (offset + w) / s
        w = prev.weight.data
        sd = s.to(w.device)
        off = spec.norm_offset
        w.copy_(((w.float() + off) / sd - off).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.copy_((prev.bias.data.float() / sd).to(prev.bias.dtype))
    for m in rg.layers:
        wl = weight_nk(m)
        wl.copy_((wl.float() * s.to(wl.device)[None, :]).to(wl.dtype))
