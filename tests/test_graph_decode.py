"""StaticDecoder (the CUDA-graph decode loop of bench/kernels.py) computes the model's own function.

On CPU the step runs eagerly; the graph replays the same ops, so matching the transformers forward
here is what makes the GPU tokens/s comparable to the model's."""
import pytest
import torch

from awq_nb.errors import AwqNbError
from awq_nb.graph_decode import StaticDecoder
from tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "llama_mha", "mistral", "qwen2", "qwen3"])
def test_step_logits_match_transformers_forward(family):
    model = tiny_model(family, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[0]                                   # [12, vocab]
    decoder = StaticDecoder(model, max_len=16)
    decoder.reset(int(ids[0, 0]))
    for t in range(ids.shape[1]):
        decoder.token.fill_(int(ids[0, t]))
        logits = decoder.step()
        torch.testing.assert_close(logits, ref[t], rtol=1e-4, atol=1e-4)
    assert int(decoder.pos) == ids.shape[1]


def test_generate_equals_transformers_greedy():
    model = tiny_model("llama", seed=5)
    prompt = [3, 17, 42, 9]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=0)[0, len(prompt):].tolist()
    decoder = StaticDecoder(model, max_len=16)
    assert decoder.generate(prompt, new_tokens=8) == ref
    assert decoder.generate(prompt, new_tokens=8) == ref  # a second run resets the cache state
    assert decoder.tokens_per_s > 0


def test_errors_name_the_fix():
    with pytest.raises(AwqNbError, match="model.generate"):
        StaticDecoder(tiny_model("gpt2"))
    decoder = StaticDecoder(tiny_model("llama"), max_len=8)
    with pytest.raises(AwqNbError, match="larger max_len"):
        decoder.generate([1, 2, 3], new_tokens=6)
    with pytest.raises(AwqNbError, match="CUDA graphs need"):
        decoder.generate([1, 2], new_tokens=2, graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by bench/gpu_check.sh)")
def test_cuda_graph_replay_matches_eager_steps_with_int4_layers():
    from awq_nb.wqlinear import WQLinear

    model = tiny_model("llama", seed=2, hidden=128).half().cuda()
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            model.model.layers.set_submodule(name, WQLinear.from_linear(module, 4, 64))
    ids = [5, 6, 7, 8, 9, 10]
    decoder = StaticDecoder(model, max_len=8)
    decoder.reset(ids[0])
    eager = []
    for t in ids:  # teacher-forced, so one flipped argmax cannot change what follows
        decoder.token.fill_(t)
        eager.append(decoder.step().float().clone())
    decoder.capture()
    decoder.reset(ids[0])
    for t, ref in zip(ids, eager):
        decoder.token.fill_(t)
        decoder.graph.replay()
        torch.testing.assert_close(decoder.logits.float(), ref, rtol=2e-2, atol=2e-2)
    assert int(decoder.pos) == len(ids)
