"""Perplexity over non-overlapping windows: the accuracy protocol of docs/architecture.md.

Token ids ``t`` of length ``N`` are cut into ``W = N // L`` windows of ``L`` tokens (``L = 512``);
the ``N mod L`` trailing tokens are dropped, as the protocol evaluates exactly 20,480 = 40 x 512
tokens per slice. Each window ``x`` is scored by ``model(x, labels=x)``, whose ``.loss`` is the
mean over its ``L - 1`` next-token predictions of ``-log p(x[j+1] | x[:j+1])``. Windows are
weighted by their prediction counts::

    nll = sum_w (L - 1) * loss_w / (W * (L - 1)),      ppl = exp(nll)

so ``ppl`` is the exponential of the mean over all ``W * (L - 1)`` predictions; no context crosses
a window boundary.

BOS: none is added. The SmolLM2 tokenizer adds no special tokens by default (its BOS,
``<|im_start|>``, is the chat-turn marker), and the protocol's reference numbers (dequantized
model: docs 12.938, code 8.141) are reproduced with plain ``tokenizer(text)`` ids, with neither
a BOS per window nor one at the start of the text.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from tqdm.auto import tqdm

from qnpu.data import read_slice, slice_info

WINDOW = 512


def ppl_of(nll: float) -> float:
    """``exp(nll)``, and ``inf`` where that exceeds the float range (a mean NLL above ~709.78 nats:
    a collapsed model, e.g. W4A4 without outlier handling); NaN stays NaN."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def perplexity(model, token_ids: torch.Tensor, window: int = WINDOW, *, progress: bool = True,
               device: torch.device | str | None = None) -> dict:
    """Perplexity of a causal LM on ``token_ids`` (1-d integer tensor) over windows of ``window``.

    ``model`` is any module whose ``model(x, labels=x)`` (``x``: ``[1, window]`` long) returns an
    object with a scalar ``.loss``, the mean next-token cross-entropy (Hugging Face causal LMs).
    It runs under ``torch.inference_mode`` in eval mode (the previous train/eval mode is restored)
    on ``device`` (default: the device of the model's first parameter).

    Returns ``{"ppl", "nll", "n_windows", "n_predictions", "window", "n_dropped"}``, ``nll`` the
    mean negative log-likelihood in nats and ``n_dropped`` the trailing tokens left out.
    A progress bar per window goes to stderr unless ``progress=False``.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-d tensor of token ids, got "
                         f"{type(token_ids).__name__} of shape {tuple(getattr(token_ids, 'shape', ()))}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must hold integer ids, got dtype {token_ids.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (each window gives window - 1 predictions), "
                         f"got {window!r}")
    n_windows = token_ids.numel() // window
    if n_windows == 0:
        raise ValueError(f"need at least window={window} tokens for one window, got {token_ids.numel()}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")

    ids = token_ids[: n_windows * window].to(device=device, dtype=torch.long).reshape(n_windows, window)
    total = 0.0  # float64 sum of per-prediction NLL
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n_windows, desc="perplexity", unit="window",
                                          file=sys.stderr, disable=not progress) as bar:
            for w in range(n_windows):
                x = ids[w : w + 1]
                loss = model(x, labels=x).loss
                if loss is None or loss.numel() != 1:
                    raise ValueError("model(x, labels=x) must return a scalar .loss (a causal LM)")
                total += float(loss) * (window - 1)
                count += window - 1
                bar.update(1)
                bar.set_postfix(ppl=f"{ppl_of(total / count):.3f}")
    finally:
        model.train(was_training)
    nll = total / count
    return {"ppl": ppl_of(nll), "nll": nll, "n_windows": n_windows, "n_predictions": count,
            "window": window, "n_dropped": token_ids.numel() - n_windows * window}


def timed_perplexity(model, token_ids: torch.Tensor, *, progress: bool = True) -> dict:
    """``{"ppl", "tokens", "seconds"}`` of `perplexity` over windows of `WINDOW`: the per-slice row of
    the quantize and eval reports (``tokens`` counts the scored windows' tokens)."""
    start = time.perf_counter()
    result = perplexity(model, token_ids, progress=progress)
    return {"ppl": result["ppl"], "tokens": result["n_windows"] * result["window"],
            "seconds": round(time.perf_counter() - start, 2)}


def tokenize_slice(tokenizer, name: str, n_tokens: int | str | None = None) -> torch.Tensor:
    """The first ``n_tokens`` ids (1-d long tensor) of committed slice ``name``, without BOS.

    ``n_tokens`` defaults to the slice's protocol length from the manifest (65,536 for
    ``calibration``, 20,480 for ``docs`` and ``code``); ``"all"`` gives every token the tokenizer
    makes of the slice (another model's tokenizer may make fewer or more). The slice's sha256 is
    checked first.
    """
    info = slice_info(name)
    n = info["n_tokens"] if n_tokens is None else n_tokens
    if n != "all" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n_tokens must be a positive int or 'all', got {n!r}")
    ids = tokenizer(read_slice(name), add_special_tokens=False)["input_ids"]
    if n == "all":
        return torch.tensor(ids, dtype=torch.long)
    if len(ids) < n:
        raise ValueError(f"slice {name!r} has {len(ids)} tokens with this tokenizer, fewer than the "
                         f"{n} asked for (the slices hold {info['n_tokens']} default-model tokens); ask for "
                         f"at most {len(ids)} (qnpu --eval-tokens)")
    return torch.tensor(ids[:n], dtype=torch.long)


def slice_perplexity(model, tokenizer, name: str, window: int = WINDOW, *, progress: bool = True,
                     device: torch.device | str | None = None) -> dict:
    """:func:`perplexity` on the protocol tokens of slice ``name`` (``'docs'`` or ``'code'``)."""
    result = perplexity(model, tokenize_slice(tokenizer, name), window, progress=progress, device=device)
    return {"slice": name, **result}
