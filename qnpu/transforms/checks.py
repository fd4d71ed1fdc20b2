"""Argument checks for transform factories and cores: one message shape for every refusal.

Each check raises ``ValueError("<method>: <name>=<value!r> is invalid; allowed: <what>")`` (the
shape `qnpu.qcore.QSpec` uses too), so a bad recipe argument names the transform, the argument and
what it may be. Booleans are refused where a number is wanted (``True`` is an ``int`` to Python),
and a number must be an ``int`` or ``float``, never a string. ``hint`` adds a note after the
allowed values (``"(128 is the paper's)"``); ``none`` lets ``None`` through and says what it means.
"""
from __future__ import annotations

import math
from typing import NoReturn


def refuse(method: str, name: str, value, allowed: str) -> NoReturn:
    """Raise the one-line ValueError every check here raises."""
    raise ValueError(f"{method}: {name}={value!r} is invalid; allowed: {allowed}")


def _allowed(what: str, hint: str, none: str | None) -> str:
    return what + (f" or None ({none})" if none is not None else "") + (f" {hint}" if hint else "")


def check_flags(method: str, **flags) -> None:
    """Each keyword's value is a bool (``1`` and ``"yes"`` are refused)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            refuse(method, name, value, "True | False")


def check_int(method: str, name: str, value, lo: int = 1, hi: int | None = None, *, hint: str = "",
              none: str | None = None) -> None:
    """``value`` is an int (not a bool) in ``lo..hi`` (``hi=None``: no upper bound)."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        what = f"an int in {lo}..{hi}" if hi is not None else f"an int >= {lo}"
        refuse(method, name, value, _allowed(what, hint, none))


def check_range(method: str, name: str, value, lo: float, hi: float = math.inf, *, open_lo: bool = False,
                open_hi: bool = False, hint: str = "", none: str | None = None) -> None:
    """``value`` is an int or float (not a bool, not NaN) in the interval from ``lo`` to ``hi``,
    each end closed unless ``open_lo`` / ``open_hi``; ``hi=inf`` asks for a finite number."""
    if value is None and none is not None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        above = value > lo if open_lo else value >= lo
        below = (value < hi if open_hi else value <= hi) if math.isfinite(hi) else math.isfinite(value)
        ok = above and below
    if not ok:
        if math.isfinite(hi):
            what = f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        else:
            what = f"a finite number {'>' if open_lo else '>='} {lo:g}"
        refuse(method, name, value, _allowed(what, hint, none))


def check_choice(method: str, name: str, value, choices) -> None:
    """``value`` is one of ``choices`` (compared with ``==`` on strings; other types are refused)."""
    if not isinstance(value, str) or value not in choices:
        refuse(method, name, value, " | ".join(map(repr, choices)))
