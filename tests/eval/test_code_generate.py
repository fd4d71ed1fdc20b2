"""Generation settings and teacher-forced reference scoring on a tiny random Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

from qnpu.eval.code.generate import GenerationConfig, generate, reference_nll
from qnpu.eval.code.metrics import repetition_loop
from tests.eval.fakes import CharTokenizer, tiny_llama


def test_reference_nll_is_the_teacher_forced_sum_over_the_reference_tokens():
    model, tok = tiny_llama(), CharTokenizer()
    nll, n = reference_nll(model, tok, "def f():\n", "    return 1\n")
    ctx, ref = tok("def f():\n")["input_ids"], tok("    return 1\n")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + ref])).logits[0].double()
    expected = F.cross_entropy(logits[len(ctx) - 1:-1], torch.tensor(ref), reduction="sum").item()
    assert n == len(ref) and nll == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(nll) and reference_nll(model, tok, "x", "")[1] == 0


def test_a_context_beyond_the_model_limit_keeps_its_last_tokens():
    model, tok = tiny_llama(), CharTokenizer()
    nll, n = reference_nll(model, tok, "y" * 600, "z" * 20)  # max_position_embeddings is 512
    assert n == 20 and math.isfinite(nll)


def test_greedy_is_deterministic_and_sampling_is_seeded_without_touching_the_global_rng():
    model, tok = tiny_llama(), CharTokenizer()
    greedy = GenerationConfig(max_new_tokens=8)
    assert generate(model, tok, "abc", greedy, 0) == generate(model, tok, "abc", greedy, 5)
    sampled = GenerationConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = generate(model, tok, "abc", sampled, 7), generate(model, tok, "abc", sampled, 7)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and len(a) == 3
    for s in a:
        assert s.n_tokens <= 8 and s.hit_limit == (s.n_tokens == 8)
        assert s.loop_period == (repetition_loop(s.token_ids, 8) if s.hit_limit else None)


@pytest.mark.parametrize("kwargs, flag", [({"n": 2}, "--samples-per-problem 2 with greedy"),
                                          ({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                                          ({"max_new_tokens": 0}, "--max-new-tokens"), ({"seed": -1}, "--seed")])
def test_bad_generation_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        GenerationConfig(**kwargs)
