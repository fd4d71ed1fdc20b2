"""The pure parts of the paper scripts in examples/: which recipe each accuracy-map cell runs, the
resumable result file, and the tables built from measured cells (the runs themselves load real
models and are exercised by running the scripts)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield {name: importlib.import_module(name) for name in ("common", "accuracy_map", "cot_table")}
    finally:
        sys.path.remove(str(EXAMPLES))


def _specs(recipe_dict: dict) -> dict:
    first = recipe_dict["transforms"][0]
    assert first["transform"] == "quant_specs"
    return {k: v["__qspec__"] for k, v in first.items() if isinstance(v, dict) and "__qspec__" in v}


@pytest.mark.parametrize("method,bits", [("rtn", 2), ("gptq", 3), ("gptaq", 4), ("awq", 8), ("smoothquant", 4),
                                         ("smoothquant", 8), ("slim-llm", 3)])
def test_each_cell_quantizes_at_its_own_bits(scripts, method, bits):
    from qnpu.transforms import recipe_to_dict

    d = recipe_to_dict(scripts["accuracy_map"].recipe(method, bits, None))
    specs = _specs(d)
    assert specs["weight"]["bits"] == bits
    assert specs["weight"]["symmetric"] == (bits >= 4)
    names = [t["transform"] for t in d["transforms"][1:]]
    expected = {"rtn": ["rtn"], "gptq": ["gptq"], "gptaq": ["gptaq"], "awq": ["awq", "rtn"],
                "smoothquant": ["smoothquant", "rtn"], "slim-llm": ["slim_llm"]}[method]
    assert names == expected
    if method == "smoothquant":  # W{b}A{b}: activations at the same width, per token
        assert specs["activation"]["bits"] == bits and specs["activation"]["granularity"] == "token"
    else:
        assert "activation" not in specs


def test_cells_without_a_setting_are_skipped(scripts):
    recipe = scripts["accuracy_map"].recipe
    assert recipe("billm", 4, None) is None and recipe("billm", 1, None) is not None
    assert recipe("gptq", 1, None) is None
    assert recipe("smoothquant", 3, None) is None
    assert recipe("slim-llm", 4, None) is None


def test_results_resume_only_with_the_same_setup(scripts, tmp_path):
    Results = scripts["common"].Results
    r = Results(tmp_path, "x", {"samples": 4})
    r.put("a", {"docs": 1.0})
    r.put("b", {"error": "boom"})
    again = Results(tmp_path, "x", {"samples": 4})
    assert "a" in again and "b" not in again  # a failed cell runs again
    changed = Results(tmp_path, "x", {"samples": 8})
    assert "a" not in changed
    assert json.loads((tmp_path / "x.json.old").read_text())["cells"]["a"] == {"docs": 1.0}


def test_accuracy_map_table_puts_each_cell_in_its_column(scripts):
    m = scripts["accuracy_map"]
    data = {"setup": {"model": "m", "samples": 1, "seq_len": 8, "seed": 0, "eval_tokens": 64, "ref_problems": 2},
            "env": "env", "cells": {"fp": {"docs": 10.0, "code": 5.0, "reference": {"ppl": 2.0}},
                                    "gptq-w4": {"docs": 11.0, "code": 6.0, "reference": {"ppl": 3.0}},
                                    "smoothquant-w4": {"docs": None, "code": None},
                                    "rtn-w8": {"error": "x"}}}
    table = m.markdown(data, ["gptq", "smoothquant", "rtn"], [4, 8])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows["gptq"] == ["11.00 / 6.00 / 3.00", "-"]
    assert rows["smoothquant"] == ["inf / inf / inf", "-"]
    assert rows["rtn"] == ["-", "failed"]


def test_cot_table_speedup_is_fp_latency_over_setting_latency(scripts):
    c = scripts["cot_table"]
    mode = {"pass@1": 0.5, "answer_tokens_mean": 10.0, "answer_words_mean": 8.0, "repetition_rate": 0.25,
            "hit_limit_rate": 0.0, "cot_applied": "x"}
    eff = {"prefill_at": "batch 1 x 8", "decode_tokens_per_s": 1.0, "peak_memory_bytes": 2**21, "weight_bytes": 2**20,
           "kind": "float"}
    data = {"setup": {"model": "m", "limit": 2, "max_new_tokens": 8, "samples": 1, "seq_len": 8}, "env": "env",
            "cells": {"fp/code": {"reference_ppl": 2.0, "modes": {"no_think": mode}},
                      "fp/efficiency": {**eff, "prefill_ms": 30.0},
                      "w4a8/code": {"reference_ppl": 3.0, "modes": {"no_think": mode}},
                      "w4a8/efficiency": {**eff, "prefill_ms": 20.0, "kind": "simulated"}}}
    lines = [line for line in c.markdown(data, ["fp", "w4a8"]).splitlines() if line.startswith("| w4a8")]
    cells = [x.strip() for x in lines[0].split("|")[1:-1]]
    assert cells[:4] == ["w4a8", "no_think", "0.500", "3.000"]
    assert cells[6:] == ["20.0", "1.50", "2", "1.0"]


def test_list_arguments_refuse_empty_and_mistyped_items(scripts):
    csv = scripts["common"].csv
    assert csv("2, 3", int) == [2, 3]
    with pytest.raises(SystemExit, match="empty item"):
        csv("2,,3", int)
    with pytest.raises(SystemExit, match="must be a int"):
        csv("2,x", int)


def test_cot_table_keeps_a_setting_whose_efficiency_step_failed(scripts):
    c = scripts["cot_table"]
    mode = {"pass@1": 0.0, "answer_tokens_mean": 5.0, "answer_words_mean": 4.0, "repetition_rate": 0.0,
            "hit_limit_rate": 0.0, "cot_applied": "x"}
    data = {"setup": {"model": "m", "limit": 2, "max_new_tokens": 8, "samples": 1, "seq_len": 8}, "env": "env",
            "cells": {"w4a8/code": {"reference_ppl": 3.0, "modes": {"no_think": mode}},
                      "w4a8/efficiency": {"error": "RuntimeError: boom"}}}
    table = c.markdown(data, ["w4a8"])
    row = [line for line in table.splitlines() if line.startswith("| w4a8")][0]
    assert [x.strip() for x in row.split("|")[1:-1]][6:] == ["-", "-", "-", "-"]
    assert "- w4a8/efficiency: RuntimeError: boom" in table
