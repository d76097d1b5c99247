"""Shared fixtures. The real-model fixtures load the bundled SmolLM2 once per session."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` for the bundled SmolLM2-135M in fp32 (converted from GGUF once, then cached)."""
    import awq_nb

    torch.manual_seed(0)
    return awq_nb.load_model("smollm2-135m")
