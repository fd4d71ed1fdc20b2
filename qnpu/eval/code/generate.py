"""Generation of answers and teacher-forced scoring of reference solutions.

`generate(model, tokenizer, prompt, config, seed)` returns ``n`` samples of at most
``max_new_tokens`` tokens: greedy decoding when ``temperature == 0`` (then ``n`` must be 1), else
sampling with ``temperature`` and ``top_p`` (nucleus), seeded per call (the global torch RNG is
left as it was). Generation stops at the tokenizer's EOS token and the ids in the model's
generation config.

`reference_nll(model, tokenizer, context, reference)` is the summed negative log-likelihood (nats,
float64) of the reference's tokens given the context, in one teacher-forced forward pass:
``ids = tokenizer(context) + tokenizer(reference, add_special_tokens=False)``, the reference's
tokens scored by the logits at the positions before them; a context longer than the model's
``max_position_embeddings`` leaves room by dropping its oldest tokens. The per-problem conditional
perplexity is ``exp(nll / n_tokens)``; the aggregate is token-weighted,
``exp(sum nll / sum n_tokens)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qnpu.eval.code.metrics import repetition_loop

MAX_BATCH = 8  # samples generated together


@dataclass(frozen=True)
class GenerationConfig:
    """``n`` samples per problem; ``temperature`` 0 is greedy; ``top_p`` the nucleus mass;
    ``max_new_tokens`` the limit per answer; ``seed`` + the problem's index seeds its sampling."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        checks = (("--samples-per-problem", self.n, isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
                  ("--temperature", self.temperature, self.temperature >= 0 and math.isfinite(self.temperature),
                   "a number >= 0 (0: greedy)"),
                  ("--top-p", self.top_p, 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("--max-new-tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int)
                   and self.max_new_tokens >= 1, "an integer >= 1"),
                  ("--seed", self.seed, isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"))
        for flag, value, ok, allowed in checks:
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{flag} {value!r} is invalid; allowed: {allowed}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"--samples-per-problem {self.n} with greedy decoding (--temperature 0) gives {self.n} "
                             "identical samples; sample with --temperature > 0 (e.g. 0.8) for pass@k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: tuple[int, ...]
    hit_limit: bool
    loop_period: int | None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_words(self) -> int:
        return len(self.text.split())


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _device(model) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def generate(model, tokenizer, prompt: str, config: GenerationConfig, seed: int, *,
             add_special_tokens: bool = False) -> list[Sample]:
    """``config.n`` answers to ``prompt`` (see the module docstring). A chat prompt already holds its
    special tokens; a raw prompt may want the tokenizer's (``add_special_tokens=True``: a BOS)."""
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    ids = enc["input_ids"].to(_device(model))
    mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"])).to(ids.device)
    kwargs = {"max_new_tokens": config.max_new_tokens, "pad_token_id": pad, "eos_token_id": stops or None}
    if config.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=None)
    samples: list[Sample] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            while len(samples) < config.n:
                batch = min(MAX_BATCH, config.n - len(samples))
                out = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=batch, **kwargs)
                for row in out[:, ids.shape[1]:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in stops), None)
                    tokens = tuple(row if cut is None else row[:cut])
                    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
                    samples.append(Sample(text=text, token_ids=tokens, hit_limit=cut is None and
                                          len(tokens) >= config.max_new_tokens,
                                          loop_period=repetition_loop(tokens, config.max_new_tokens)
                                          if cut is None else None))
    finally:
        model.train(was_training)
    return samples


def reference_nll(model, tokenizer, context: str, reference: str) -> tuple[float, int]:
    """``(sum of NLL in nats, number of reference tokens)`` (see the module docstring)."""
    ctx = tokenizer(context)["input_ids"]
    ref = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if not ref:
        return 0.0, 0
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and len(ctx) + len(ref) > limit:
        ref = ref[: limit - 1]
        ctx = ctx[max(0, len(ctx) - (limit - len(ref))):]
    if not ctx:  # the first reference token needs something before it
        ctx, ref = ref[:1], ref[1:]
    x = torch.tensor([ctx + ref], dtype=torch.long, device=_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(x).logits[0, len(ctx) - 1: -1].double()
    finally:
        model.train(was_training)
    targets = x[0, len(ctx):]
    nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
    return float(nll), len(ref)
