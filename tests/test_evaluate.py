import copy
import math

import torch
import torch.nn.functional as F

import awq_nb
from awq_nb import evaluate
from awq_nb.evaluate import kl_divergence, model_size_bytes, perplexity
from tiny_models import tiny_model, tiny_tokenizer


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama_mha")
    w = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, windows=w)
    with torch.no_grad():
        logits = model(w).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), w[:, 1:].reshape(-1))
    assert r["windows"] == 3 and r["tokens"] == 3 * 39
    assert math.isclose(r["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


def test_kl_is_zero_for_the_same_model_and_positive_after_rounding():
    model = tiny_model("llama_mha")
    w = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    same = kl_divergence(model, model, w)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    rtn = awq_nb.fake_quantize(copy.deepcopy(model), awq_nb.AWQConfig(w_bit=2, group_size=32))
    assert kl_divergence(model, rtn, w)["kl"] > 1e-4


def test_model_size_counts_packed_weights_and_tied_embeddings_once():
    model = tiny_model("llama_mha")
    fp = model_size_bytes(model)
    params = {id(p): p for p in model.parameters()}
    assert fp == sum(p.numel() * 4 for p in params.values())
    lin = awq_nb.arch.find_quantizable(model)
    lin_elems = sum(m.weight.numel() for m in lin.values())
    groups = lin_elems // 32
    q = model_size_bytes(model, w_bit=4, group_size=32)
    assert q == fp - lin_elems * 4 + lin_elems // 2 + groups * 2 + groups // 2


def test_decode_speed_is_new_tokens_over_the_timed_generate(monkeypatch):
    # A clock that only the model's generate moves (0.5 s per call) makes the expected speed exact.
    model, tok = tiny_model("llama"), tiny_tokenizer()
    clock, calls = [100.0], []
    generate = model.generate

    def timed_generate(ids, **kwargs):
        out = generate(ids, **kwargs)
        calls.append((kwargs.get("min_new_tokens"), kwargs["max_new_tokens"], out.shape[1] - ids.shape[1]))
        clock[0] += 0.5
        return out

    model.generate = timed_generate
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])
    speed = evaluate.decode_tokens_per_s(model, tok, prompt="t5 t6 t7", new_tokens=12, warmup_tokens=3)
    assert len(calls) == 2 and calls[0][:2] == (None, 3)  # a warm-up of 3 tokens (an EOS may end it early)
    assert calls[1] == (12, 12, 12)  # then exactly 12 new tokens, timed
    assert speed == 12 / 0.5
