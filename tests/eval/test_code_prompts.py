"""CoT modes through chat templates: openPangu-Embedded's tags, Qwen3's enable_thinking, a generic
system instruction, and the raw-prompt fallback."""
import pytest

from qnpu.eval.code.prompts import NO_THINK_INSTRUCTION, SLOW_INSTRUCTION, build_prompt, check_cot, template_style
from tests.eval.fakes import GENERIC, PANGU, QWEN3, CharTokenizer


def test_openpangu_modes_append_the_documented_tags():
    tok = CharTokenizer(PANGU)
    assert template_style(tok) == "openpangu"
    text, how = build_prompt(tok, "Write f.", "raw", "no_think")
    assert text.endswith("[unused9]用户：Write f. /no_think[unused10][unused9]助手：")
    assert "/auto_think[unused10]" in build_prompt(tok, "Write f.", "raw", "auto_think")[0]
    slow, how = build_prompt(tok, "Write f.", "raw", "slow_think")
    assert "/" not in slow.split("用户：")[1] and "slowly by default" in how["cot_applied"]


def test_enable_thinking_templates_get_the_flag():
    tok = CharTokenizer(QWEN3)
    assert template_style(tok) == "enable_thinking"
    text, how = build_prompt(tok, "Write f.", "raw", "no_think")
    assert text.endswith("<think>\n\n</think>\n\n") and how["cot_applied"] == "enable_thinking=False"
    assert "<think>" not in build_prompt(tok, "Write f.", "raw", "slow_think")[0]
    assert "template default" in build_prompt(tok, "Write f.", "raw", "auto_think")[1]["cot_applied"]


def test_other_templates_get_a_system_instruction():
    tok = CharTokenizer(GENERIC)
    assert template_style(tok) == "generic"
    assert build_prompt(tok, "Write f.", "raw", "slow_think")[0].startswith(f"<|system|>{SLOW_INSTRUCTION}")
    assert build_prompt(tok, "Write f.", "raw", "no_think")[0].startswith(f"<|system|>{NO_THINK_INSTRUCTION}")
    text, how = build_prompt(tok, "Write f.", "raw", None)
    assert text == "<|user|>Write f.\n<|assistant|>" and how == {"format": "chat", "template": "generic",
                                                               "cot_applied": "template default"}


def test_no_chat_template_falls_back_to_the_raw_prompt():
    tok = CharTokenizer(None)
    text, how = build_prompt(tok, "Write f.", "def f():\n", "no_think")
    assert text == "def f():\n" and how["format"] == "raw" and "no chat template" in how["cot_applied"]


def test_cot_values():
    assert check_cot(None) == [None]
    assert check_cot("no_think,slow_think") == ["no_think", "slow_think"]
    with pytest.raises(ValueError, match="--cot 'fast' is invalid; allowed: slow_think, auto_think, no_think"):
        check_cot("fast")
    with pytest.raises(ValueError, match="each mode once"):
        check_cot("no_think,no_think")
