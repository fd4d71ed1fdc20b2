"""Code out of a chat answer, and the program that is run against a problem's tests.

`extract_code(text, entry_point)`:

1. Reasoning is dropped: ``<think>...</think>`` blocks (Qwen3 style) and openPangu-Embedded's
   ``[unused16]...[unused17]``; an unclosed opening tag (the limit hit mid-thought) drops the rest
   of the text after it.
2. Fenced markdown blocks (```` ``` ```` with or without a language tag; a fence left open at the
   end of a truncated answer runs to the end) are candidates. Blocks tagged with another language
   than Python are skipped. The first block that defines ``entry_point`` wins, else the first
   Python or untagged block.
3. With no fenced block, the raw text is the code.

`humaneval_program(prompt, code, entry_point)` completes the prompt's function: an answer that
defines ``entry_point`` itself is put after the prompt's preamble (the imports and helpers before
``def entry_point``, which answers often leave out); otherwise the answer is the function's body
and is appended to the prompt (indented by four spaces when its first line is not indented).
"""
from __future__ import annotations

import re

PYTHON_TAGS = {"", "python", "py", "python3", "py3", "pycon", "ipython"}
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_THINK = (("<think>", "</think>"), ("[unused16]", "[unused17]"))


def strip_reasoning(text: str) -> str:
    """``text`` without reasoning blocks (see the module docstring)."""
    for start, end in _THINK:
        while start in text:
            head, _, rest = text.partition(start)
            if end in rest:
                text = head + rest.split(end, 1)[1]
            else:
                text = head
        text = text.replace(end, "")  # a closing tag whose opening tag was in the prompt
    return text


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model's answer (see the module docstring)."""
    text = strip_reasoning(text)
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    python = [body for tag, body in blocks if tag in PYTHON_TAGS]
    if entry_point:
        for body in python:
            if _defines(body, entry_point):
                return body.rstrip() + "\n"
    if python:
        return python[0].rstrip() + "\n"
    return text.strip("\n").rstrip() + "\n"  # no block, or only blocks of other languages


def preamble(prompt: str, entry_point: str) -> str:
    """The part of a HumanEval prompt before ``def entry_point`` (imports, helper functions)."""
    match = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", prompt, re.MULTILINE)
    return prompt[: match.start()] if match else prompt


def humaneval_program(prompt: str, code: str, entry_point: str) -> str:
    """The solution program: the completed function (see the module docstring)."""
    if _defines(code, entry_point):
        return preamble(prompt, entry_point) + code
    lines = code.split("\n")
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        code = "\n".join(("    " + line) if line.strip() else line for line in lines)
    return prompt + code
