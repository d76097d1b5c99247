"""Tiny random models, one per registered family, built from transformers configs."""
from __future__ import annotations

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, pad_token_id=0)),
}


def tiny_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2):
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    base = dict(
        vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=64,
    )
    if family == "gpt2":
        base = dict(vocab_size=128)
    cfg = getattr(transformers, cfg_name)(**{**base, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so folding is really exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
    return model


def tiny_tokenizer():
    """A word-level fast tokenizer over ``t0 .. t255`` (no downloads), for checkpoints and folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1")
