"""Batch-1 greedy decoding with a static KV cache, capturable as one CUDA graph per token.

Why this exists: a Hugging Face ``generate`` step runs hundreds of small kernels, each launched from
Python. For a 135M model, or any model at batch 1 on a fast GPU, the launches cost more than the
maths, so eager tokens/s says little about the INT4 kernels. Serving engines (vLLM, TensorRT-LLM,
gpt-fast) replay a captured CUDA graph per token instead. :class:`StaticDecoder` does the same
for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) over the model's own modules, so an
fp16 ``nn.Linear`` and our ``WQLinear`` are timed through the same code::

    decoder = StaticDecoder(model, max_len=256)
    tokens = decoder.generate(prompt_ids, new_tokens=64, graph=True)    # graph=False: eager
    decoder.tokens_per_s                                                 # of the last generate

One step (token ``t`` at position ``p``): embed, then per layer ``h += o_proj(attn(rope(q), K, V))``
with ``K[:, :, p] = rope(k)``, ``V[:, :, p] = v`` written in place, ``h += down(silu(gate) * up)``,
final norm, lm_head, argmax. Positions after ``p`` are masked with ``-inf``, so the cache has a
fixed shape and nothing in a step depends on a value read back to the host: the graph replays with
``token`` and ``pos`` updated in place (the argmax and ``pos + 1`` are part of the graph).

Correctness is checked on CPU against the model's own forward (tests/test_graph_decode.py).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AwqNbError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoder:
    """Greedy batch-1 decoder over a Llama-family ``*ForCausalLM`` with a preallocated KV cache.

    Args:
        model: a transformers Llama-family causal LM (its Linear layers may be ``WQLinear``).
        max_len: prompt + new tokens the cache holds.
    """

    def __init__(self, model: nn.Module, max_len: int = 256):
        config = model.config
        if config.model_type not in LLAMA_LIKE:
            raise AwqNbError(f"StaticDecoder supports {', '.join(LLAMA_LIKE)} models, got model_type "
                             f"{config.model_type!r}; use model.generate() for other architectures.")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window and max_len > window:
            raise AwqNbError(f"max_len={max_len} exceeds the model's sliding_window={window}, which StaticDecoder "
                             "does not implement; keep max_len <= sliding_window or use model.generate().")
        if max_len < 4:
            raise AwqNbError(f"max_len={max_len}: the cache needs at least 4 positions (capture warms up on 3).")
        self.model, self.max_len = model, max_len
        base = model.model
        first = base.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = first.scaling
        embed = base.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        shape = (len(base.layers), self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = base.rotary_emb(embed[:1][None], positions)       # [1, max_len, head_dim]
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        self.key_positions = torch.arange(max_len, device=self.device)
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens_per_s = float("nan")

    # -- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed ``self.token`` at ``self.pos``; set ``self.token`` to the argmax and advance ``pos``."""
        base = self.model.model
        cos = self.cos.index_select(0, self.pos)[None]                 # [1, 1, head_dim]
        sin = self.sin.index_select(0, self.pos)[None]
        masked = (self.key_positions > self.pos)[None, None, None, :]   # [1, 1, 1, max_len]
        h = base.embed_tokens(self.token)[None]                          # [1, 1, hidden]
        for i, layer in enumerate(base.layers):
            h = h + self._attention(layer, i, layer.input_layernorm(h), cos, sin, masked)
            mlp = layer.mlp
            x = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        logits = self.model.lm_head(base.norm(h))[0, -1]
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def _attention(self, layer, i, x, cos, sin, masked):
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)      # [1, H, 1, D]
        k = attn.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)   # [1, KVH, 1, D]
        v = attn.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache[i].index_copy_(1, self.pos, k[0])
        self.v_cache[i].index_copy_(1, self.pos, v[0])
        group = self.heads // self.kv_heads
        q = q.view(self.kv_heads, group, self.head_dim)                                 # [KVH, G, D]
        scores = (q @ self.k_cache[i].transpose(1, 2)).float() * self.scaling           # [KVH, G, L]
        scores = scores.masked_fill(masked[0], float("-inf"))
        out = torch.softmax(scores, dim=-1).to(self.dtype) @ self.v_cache[i]            # [KVH, G, D]
        return attn.o_proj(out.reshape(1, 1, self.heads * self.head_dim))

    # -- generation -----------------------------------------------------------------------------

    def reset(self, first_token: int) -> None:
        self.pos.zero_()
        self.token.fill_(first_token)
        self.k_cache.zero_()  # masked rows get weight 0, but 0 * a stale inf would still be NaN
        self.v_cache.zero_()

    def capture(self) -> None:
        """Capture one step as a CUDA graph (after warm-up steps that also compile the kernels)."""
        if self.device.type != "cuda":
            raise AwqNbError("CUDA graphs need the model on a CUDA device; call generate(graph=False) on CPU.")
        self.pos.zero_()  # the warm-up and captured steps write cache rows 0..3, which any run overwrites
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()
        self.pos.zero_()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor | list[int], new_tokens: int, graph: bool = False) -> list[int]:
        """Greedy continuation of ``prompt`` (token ids): the prompt is fed one token per step, then
        ``new_tokens`` are generated; returns them. Sets :attr:`tokens_per_s` for the new tokens."""
        ids = [int(t) for t in (prompt.flatten().tolist() if torch.is_tensor(prompt) else prompt)]
        if not ids or len(ids) + new_tokens > self.max_len:
            raise AwqNbError(f"prompt of {len(ids)} tokens + {new_tokens} new tokens must be 1..{self.max_len} "
                             "(max_len); build the StaticDecoder with a larger max_len.")
        if graph and self.graph is None:
            self.capture()
        run = self.graph.replay if graph else self.step
        self.reset(ids[0])
        for t in ids[1:]:  # prefill token by token (the step also computes an unused argmax)
            run()
            self.token.fill_(t)
        out = torch.empty(new_tokens, dtype=torch.long, device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        for i in range(new_tokens):
            run()
            out[i] = self.token[0]
        _sync(self.device)
        self.tokens_per_s = new_tokens / (time.perf_counter() - start)
        return out.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
