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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a shared 2-core box, small ops with 2 threads
    mostly wait on each other (a tiny model's greedy decode runs ~25x faster with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
