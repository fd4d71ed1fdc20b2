"""qnpu models as lm-evaluation-harness models: `QnpuLM`, registered with lm-eval as ``qnpu``.

Importing this module imports ``lm_eval`` (``pip install -e '.[lmeval]'``); nothing else in qnpu
does, so qnpu imports without it. `QnpuLM` only loads: the default model, a Hugging Face folder, a
``.gguf`` file or a qnpu checkpoint (`qnpu.models.load`, as ``qnpu eval``), simulated or lowered to
integer ops for a target (`qnpu.lowering.lower`), in a dtype, on a device. The scoring is lm-eval's
own ``HFLM`` (Gao et al., "A framework for few-shot language model evaluation", lm-evaluation-harness
0.4), given the loaded model and tokenizer:

* ``loglikelihood(context, continuation)``: trailing spaces of the context move to the
  continuation; the continuation's tokens are those of ``tok(context + continuation)`` after the
  first ``len(tok(context))``; an empty context is the prefix token (BOS, else EOS). The value is
  the sum of the log-softmax of those tokens, and the flag says whether each is the argmax.
  Requests are batched (right padding, no attention mask: causal attention keeps padding out of
  the scored positions).
* ``loglikelihood_rolling(text)``: lm-eval's rolling windows, not qnpu's perplexity protocol
  (`qnpu.eval.perplexity`: windows of 512 without a prefix, each window's first token unscored).
  The text's tokens follow the prefix token; windows hold ``max_length`` tokens and every token is
  scored exactly once, each with as much preceding context as a window holds (the last window is
  filled from the left). A text that fits one window gets its full-sequence log-likelihood.
* ``generate_until``: greedy (or the task's sampling arguments) with left padding, stopping at any
  of the task's ``until`` strings, at EOS or after ``max_gen_toks`` tokens; the stop string is cut.
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from qnpu.lowering import check_target, lower, plan, quantized_linears
from qnpu.models import load
from qnpu.models.devices import resolve_device
from qnpu.models.loading import DEFAULT_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_for_lm_eval(pretrained: str | None, *, lowered: str | None = None, device: str = "cpu",
                     dtype: str = "float32", progress: bool = True):
    """``(model, tokenizer, source)`` ready to score: loaded as ``qnpu eval`` loads it, lowered for
    ``lowered`` (a qnpu checkpoint only), in ``eval`` mode on ``device``. Arguments are checked before
    anything is loaded; errors are one-line ValueErrors (a missing path: FileNotFoundError)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    target = resolve_device(device or "cpu")
    if lowered is not None:
        try:
            check_target(lowered)
        except ValueError as err:
            raise ValueError(f"lowered: {err}") from None
    net, tokenizer, source = load(None if pretrained in DEFAULT_NAMES else pretrained, dtype=DTYPES[dtype],
                                  progress=progress)
    if tokenizer is None:
        raise ValueError(f"{pretrained} has no tokenizer files (tokenizer_config.json); lm-eval needs one")
    if lowered is not None:
        if not quantized_linears(net):
            raise ValueError(f"lowered={lowered} needs a qnpu checkpoint; {source['name']} has no quantized "
                             "linears (quantize it with qnpu quantize first)")
        source = {**source, "lowered": lowered, "schemes": sorted(set(plan(net, lowered).values()))}
        net = lower(net, lowered)
    return net.to(target).eval(), tokenizer, source


@register_model("qnpu")
class QnpuLM(HFLM):
    """lm-eval's ``HFLM`` over a model loaded by qnpu (see the module docstring for the scoring).

    ``lm_eval.simple_evaluate(model="qnpu", model_args="pretrained=CKPT,lowered=reference")`` after
    ``import qnpu.eval.lm_eval_model``; ``qnpu lm-eval`` on the command line. The arguments without a
    qnpu meaning are HFLM's: ``max_length`` (default: the model config's positions), ``batch_size``
    (an int or ``auto``), ``add_bos_token``, ``prefix_token_id``, ``softmax_dtype``,
    ``logits_cache``, ``truncation``."""

    def __init__(self, pretrained: str = "default", lowered: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int | str = 1, max_batch_size: int = 64,
                 max_length: int | None = None, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, softmax_dtype: str | None = None, logits_cache: bool = True,
                 truncation: bool = False, progress: bool = True) -> None:
        model, tokenizer, source = load_for_lm_eval(pretrained, lowered=lowered, device=device, dtype=dtype,
                                                    progress=progress)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
                         max_length=max_length, add_bos_token=add_bos_token, prefix_token_id=prefix_token_id,
                         softmax_dtype=softmax_dtype, logits_cache=logits_cache, truncation=truncation)
        self.qnpu_source = source

    def get_model_info(self) -> dict:
        """What was evaluated, for lm-eval's results ``config`` (HFLM's version asks the hub)."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "qnpu_model": self.qnpu_source}
