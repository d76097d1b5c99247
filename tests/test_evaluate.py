import copy
import math

import torch
import torch.nn.functional as F

import awq_nb
from awq_nb.evaluate import kl_divergence, model_size_bytes, perplexity
from tiny_models import tiny_model


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
