"""Chat prompts and the chain-of-thought modes ``slow_think``, ``auto_think`` and ``no_think``.

openPangu-Embedded: the model card of openPangu-Embedded-7B-V1.1 (README, section 4.3, and its
``inference/generate.py``; read in the public mirror github.com/wujing215/OpenPangu7B-on-NVIDIA)
says the model thinks slowly by default and that appending ``/auto_think`` or ``/no_think`` to the
end of the user input switches the current turn to adaptive or fast thinking; its reasoning is
printed between ``[unused16]`` and ``[unused17]`` and the turn ends with ``[unused10]``. Its chat
template (``[unused9]用户：...[unused10]``) takes no thinking variable. So for a template with
these markers: ``slow_think`` adds nothing, ``auto_think`` appends " /auto_think" and ``no_think``
appends " /no_think" to the user message.

Other templates:

* a template that reads ``enable_thinking`` (Qwen3 style): ``slow_think`` passes
  ``enable_thinking=True``, ``no_think`` passes ``enable_thinking=False``, and ``auto_think``
  passes nothing (the template's default; Qwen3 has no adaptive mode);
* any other template: ``slow_think`` adds the system message :data:`SLOW_INSTRUCTION`,
  ``no_think`` the system message :data:`NO_THINK_INSTRUCTION`, ``auto_think`` nothing. A system
  message replaces a template's default one (SmolLM2's "You are a helpful AI assistant named
  SmolLM...").

Without a mode (``None``) the template is used as it is. A tokenizer without a chat template falls
back to the task's raw prompt (HumanEval: the function to complete, as in Chen et al. 2021; MBPP:
the task as a docstring followed by an open code fence), with a warning; no mode can be applied
then, and the report says so.
"""
from __future__ import annotations

COT_MODES = ("slow_think", "auto_think", "no_think")
SLOW_INSTRUCTION = ("Think step by step before you answer: reason inside <think> and </think>, then give the "
                    "final answer.")
NO_THINK_INSTRUCTION = "Answer directly with the final answer only; do not explain your reasoning."
PANGU_MARKER = "[unused9]"


def check_cot(modes) -> list[str | None]:
    """The modes of a ``--cot`` value: a comma-separated string, a list, or None (template as is)."""
    if modes is None:
        return [None]
    items = modes.split(",") if isinstance(modes, str) else list(modes)
    items = [m.strip() for m in items]
    for mode in items:
        if mode not in COT_MODES:
            raise ValueError(f"--cot {mode!r} is invalid; allowed: {', '.join(COT_MODES)} (comma-separated for "
                             "several)")
    if len(set(items)) != len(items) or not items:
        raise ValueError(f"--cot {modes!r}: give each mode once")
    return items


def template_style(tokenizer) -> str:
    """``"none"``, ``"openpangu"``, ``"enable_thinking"`` or ``"generic"``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "none"
    text = template if isinstance(template, str) else " ".join(str(v) for v in dict(template).values())
    if PANGU_MARKER in text:
        return "openpangu"
    return "enable_thinking" if "enable_thinking" in text else "generic"


def build_prompt(tokenizer, instruction: str, raw_prompt: str, mode: str | None) -> tuple[str, dict]:
    """``(text, how)``: the prompt for ``mode`` and how the mode was applied (for the report)."""
    style = template_style(tokenizer)
    if style == "none":
        return raw_prompt, {"format": "raw", "cot_applied": "none: the tokenizer has no chat template"}
    messages, kwargs = [{"role": "user", "content": instruction}], {}
    how = "template default"
    if style == "openpangu" and mode in ("auto_think", "no_think"):
        messages[0]["content"] += f" /{mode}"
        how = f"' /{mode}' appended to the user message (openPangu-Embedded)"
    elif style == "openpangu" and mode == "slow_think":
        how = "nothing added: openPangu-Embedded thinks slowly by default"
    elif style == "enable_thinking" and mode in ("slow_think", "no_think"):
        kwargs["enable_thinking"] = mode == "slow_think"
        how = f"enable_thinking={kwargs['enable_thinking']}"
    elif style == "generic" and mode in ("slow_think", "no_think"):
        text = SLOW_INSTRUCTION if mode == "slow_think" else NO_THINK_INSTRUCTION
        messages.insert(0, {"role": "system", "content": text})
        how = f"system message: {text}"
    elif mode == "auto_think":
        how = "template default (no adaptive switch in this template)"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return text, {"format": "chat", "template": style, "cot_applied": how}
