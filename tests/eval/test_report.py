"""`qnpu report` and the plots: hand-written result files in, the same numbers out (comparison.json,
report.md tables, what each PNG drew), valid PNGs of a fixed size, sections left out when no run
holds them, and bad input exiting 2. No model runs."""
import json
import re
import struct

import pytest

import qnpu.eval.code.suite as suite
from qnpu.eval import plots
from qnpu.eval.code.generate import GenerationConfig
from qnpu.eval.code.sandbox import Limits
from tests.eval.fakes import CharTokenizer, run_cli
from tests.eval.test_code_suite import fake_generate, problems  # noqa: F401 - a fixture

MODES = ("slow_think", "auto_think", "no_think")
# per run: pass@1 and repetition rate per mode, all distinct so that a swap shows
PASS = {"fp": (0.60, 0.50, 0.40), "w8a8": (0.55, 0.45, 0.35), "w4a8": (0.30, 0.25, 0.20)}
REPEAT = {"fp": (0.00, 0.10, 0.05), "w8a8": (0.02, 0.12, 0.07), "w4a8": (0.20, 0.30, 0.25)}
REF_PPL = {"fp": 3.09, "w8a8": 3.12, "w4a8": 3.71}
PPL = {"fp": {"docs": 12.938, "code": 8.141}, "w8a8": {"docs": 12.977, "code": 8.162},
       "w4a8": {"docs": 25.23, "code": 15.63}}
PREFILL = {"fp": {(1, 128): 40.0, (4, 512): 900.0}, "w8a8": {(1, 128): 30.0, (4, 512): 600.0}}
DECODE = {"fp": 21.0, "w8a8": 17.5}
MEMORY = {"fp": (100 * 2 ** 20, 130 * 2 ** 20, 600 * 2 ** 20), "w8a8": (25 * 2 ** 20, 55 * 2 ** 20, 400 * 2 ** 20)}
LAYERS = [f"model.layers.{i}.{name}" for i in range(3) for name in ("self_attn.q_proj", "mlp.down_proj")]


def code_summary(run: str, task: str = "humaneval") -> dict:
    modes, k = {}, list(PASS).index(run)
    for i, mode in enumerate(MODES):
        counts = [i + 1, 2 + k, 0, 3]
        modes[mode] = {"problems": 10, "problems_scored": 10, "samples": 10, "cot_applied": mode,
                       "pass_at_k": {"1": PASS[run][i]}, "statuses": {"passed": 5}, "hit_limit_rate": 0.1,
                       "repetition_failures": 1, "repetition_rate": REPEAT[run][i],
                       "length_tokens": {"count": 10, "mean": 100.0 + i + 10 * k, "median": 90.0 + i, "p90": 200.0 + i,
                                         "min": 3.0, "max": 512.0, "histogram": {"edges": [0, 128, 256, 384, 512],
                                                                                 "counts": counts}},
                       "length_words": {"count": 10, "mean": 50.0}}
    return {"task": task, "model": {"name": f"model-{run}"}, "problems": 10, "cot": list(MODES), "modes": modes,
            "reference": {"ppl": REF_PPL[run], "tokens": 192, "problems": 10}, "warnings": []}


def efficiency(run: str) -> dict:
    linear, total, peak = MEMORY[run]
    return {"efficiency": {
        "device": "cpu", "dtype": "float32", "threads": 2, "torch": "2.13.0",
        "model": {"name": f"model-{run}", "kind": "float" if run == "fp" else "simulated"},
        "weight_bytes": {"linear": linear, "total": total}, "warmup": 1, "repeats": 3,
        "prefill": [{"batch": b, "prompt_len": n, "median_ms": ms, "min_ms": ms - 1, "max_ms": ms + 1,
                     "tokens_per_s": b * n / ms * 1000} for (b, n), ms in PREFILL[run].items()],
        "decode": [{"batch": 1, "prompt_len": 128, "new_tokens": 32, "median_ms_per_token": DECODE[run],
                    "tokens_per_s": 1000 / DECODE[run]}],
        "peak_memory_bytes": peak, "peak_memory_source": "tracemalloc"}}


def layer_error(run: str, i: int) -> float:
    return (0.01 if run == "w8a8" else 0.1) * (1 + i) / (1 + i % 2)  # not sorted: order must be kept


def checkpoint_meta(run: str, complete: bool = True, ppl_scale: float = 1.0) -> dict:
    rows = [{"layer": layer, "relative_output_error": layer_error(run, i)} for i, layer in enumerate(LAYERS)]
    report = {"recipe": f"{run}-recipe", "worst_layers": sorted(rows, key=lambda r: -r["relative_output_error"])[:5],
              "quantized": {name: {"ppl": v * ppl_scale, "tokens": 20480} for name, v in PPL[run].items()}}
    if complete:
        report["linear_errors"] = rows
    return {"format_version": 1, "source": {"name": "smollm2"}, "recipe": {"name": "x"}, "linears": {},
            "shards": [], "extra": {"report": report}}


def write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


@pytest.fixture
def runs(tmp_path):
    """Three runs in folders named unlike their labels: fp (code, perplexity, efficiency), w8a8 (code,
    perplexity, efficiency, checkpoint), w4a8 (code, a checkpoint whose quantize report has perplexity)."""
    folders = {"fp": tmp_path / "run_c", "w8a8": tmp_path / "run_a", "w4a8": tmp_path / "run_b"}
    for run, folder in folders.items():
        write(folder, "summary.json", code_summary(run))
    for run in ("fp", "w8a8"):
        write(folders[run], "eval.json", {"model": {"name": f"model-{run}"}, "perplexity": {
            name: {"ppl": v, "tokens": 20480, "seconds": 1.0} for name, v in PPL[run].items()}})
        write(folders[run], "efficiency.json", efficiency(run))
    write(folders["w8a8"], "qnpu.json", checkpoint_meta("w8a8", ppl_scale=2.0))  # eval.json's numbers win
    write(folders["w4a8"], "qnpu.json", checkpoint_meta("w4a8"))
    return folders


def table(markdown: str, heading: str) -> dict[str, list]:
    """The first table after ``heading``: first cell -> the leading number of each other cell."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [None if c == "-" else float(re.match(r"[-0-9.]+", c).group()) for c in cells[1:]]
    return rows


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_report(runs, out, labels="fp,w8a8,w4a8"):
    argv = ["report", *(str(runs[r]) for r in ("fp", "w8a8", "w4a8")), "--output", str(out), "--json"]
    code, stdout, err = run_cli(argv + (["--labels", labels] if labels else []))
    assert code == 0, err
    return json.loads(stdout)


def test_comparison_numbers_equal_the_inputs(runs, tmp_path):
    out = tmp_path / "report"
    data = run_report(runs, out)
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["code"] == data["code"] and [r["label"] for r in saved["runs"]] == ["fp", "w8a8", "w4a8"]
    assert [r["model"] for r in saved["runs"]] == ["model-fp", "model-w8a8", "model-w4a8"]
    code = saved["code"]["humaneval"]
    assert code["modes"] == list(MODES) and code["baseline"] == "fp"
    assert code["pass_at_1"] == {run: dict(zip(MODES, PASS[run])) for run in PASS}
    assert code["repetition_rate"] == {run: dict(zip(MODES, REPEAT[run])) for run in REPEAT}
    assert code["reference_ppl"] == REF_PPL
    assert code["length_tokens"]["w4a8"]["auto_think"]["mean"] == 121.0
    assert saved["perplexity"]["ppl"] == PPL and saved["perplexity"]["slices"] == ["docs", "code"]
    assert "qnpu.json" in saved["perplexity"]["source"]["w4a8"]  # from the quantize report
    eff = saved["efficiency"]
    assert list(eff["setup"]) == ["fp", "w8a8"]
    assert eff["prefill_ms"] == {run: {f"b{b} x {n}": ms for (b, n), ms in PREFILL[run].items()} for run in PREFILL}
    assert eff["decode_ms_per_token"] == {run: {"b1 x 128 +32": ms} for run, ms in DECODE.items()}
    assert {run: tuple(m.values()) for run, m in eff["memory"].items()} == MEMORY
    assert saved["layer_errors"]["w4a8"]["layers"] == LAYERS and saved["layer_errors"]["w8a8"]["complete"]
    assert saved["layer_errors"]["w8a8"]["errors"] == [layer_error("w8a8", i) for i in range(len(LAYERS))]
    assert saved["omitted"] == []

    md = (out / "report.md").read_text()
    assert table(md, "### pass@1") == {m: [PASS[r][i] for r in PASS] for i, m in enumerate(MODES)}
    assert table(md, "### Repetition failures") == {m: [REPEAT[r][i] for r in REPEAT] for i, m in enumerate(MODES)}
    assert table(md, "### Reference-solution perplexity") == {"humaneval": list(REF_PPL.values())}
    assert table(md, "## Perplexity") == {s: [PPL[r][s] for r in PPL] for s in ("docs", "code")}
    assert table(md, "### Prefill latency") == {f"b{b} x {n}": [PREFILL[r][(b, n)] for r in PREFILL]
                                                for (b, n) in PREFILL["fp"]}
    assert table(md, "### Memory (MiB)") == {
        what: [MEMORY[r][i] / 2 ** 20 for r in MEMORY] for i, what in enumerate(
            ("linear weights", "total weights", "peak memory"))}
    assert "| slow_think | 0.600 | 0.550 (-0.050) | 0.300 (-0.300) |" in md  # changes against the baseline
    assert "| b1 x 128 | 40.00 | 30.00 (1.33x) |" in md and "| docs | 12.938 | 12.977 (+0.30%) |" in md
    for plot in data["plots"]:
        assert f"]({plot['file']})" in md


def test_each_plot_drew_the_inputs_in_order_as_a_png_of_fixed_size(runs, tmp_path):
    out = tmp_path / "report"
    drawn = {p["file"]: p for p in run_report(runs, out)["plots"]}
    acc = drawn["humaneval-pass_at_1.png"]
    assert acc["groups"] == list(MODES) and acc["series"] == {run: list(PASS[run]) for run in PASS}
    rep = drawn["humaneval-repetition_rate.png"]
    assert rep["series"] == {run: list(REPEAT[run]) for run in REPEAT}
    hist = drawn["humaneval-length_tokens.png"]["panels"]
    assert list(hist) == list(MODES) and hist["auto_think"] == {run: [2.0, 2.0 + k, 0.0, 3.0] for k, run in enumerate(PASS)}
    assert drawn["humaneval-reference_ppl.png"]["series"] == {run: [v] for run, v in REF_PPL.items()}
    ppl = drawn["perplexity.png"]
    assert ppl["groups"] == ["docs", "code"] and ppl["series"] == {r: [PPL[r]["docs"], PPL[r]["code"]] for r in PPL}
    assert drawn["prefill_ms.png"]["series"] == {run: list(PREFILL[run].values()) for run in PREFILL}
    assert drawn["memory.png"]["series"] == {run: [b / 2 ** 20 for b in MEMORY[run]] for run in MEMORY}
    for run in ("w8a8", "w4a8"):
        layers = drawn[f"layer_errors-{run}.png"]
        assert layers["layers"] == LAYERS  # one bar per linear, in model order
        assert layers["heights"] == pytest.approx([layer_error(run, i) for i in range(len(LAYERS))])
    for name, plot in drawn.items():
        assert png_size(out / name) == ((1200, 450) if plot["kind"] == "layers" else (800, 450))
    assert set(p.name for p in out.iterdir()) == set(drawn) | {"report.md", "comparison.json"}


def test_pngs_are_the_same_bytes_for_the_same_data(tmp_path):
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        plots.grouped_bars(folder / "x.png", ["docs", "code"], {"fp": [1.0, 2.0], "q": [1.5, None]}, title="t",
                           ylabel="ppl")
        plots.layer_bars(folder / "l.png", LAYERS, [0.1] * len(LAYERS), title="t")
    for name in ("x.png", "l.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_missing_value_draws_no_bar(tmp_path):
    drawn = plots.grouped_bars(tmp_path / "x.png", ["a", "b"], {"fp": [1.0, None]}, title="t", ylabel="y")
    assert drawn["series"] == {"fp": [1.0, None]}


def test_without_labels_runs_are_named_by_folder_in_the_given_order(runs, tmp_path):
    data = run_report(runs, tmp_path / "report", labels=None)
    assert [r["label"] for r in data["runs"]] == ["run_c", "run_a", "run_b"]
    assert data["code"]["humaneval"]["pass_at_1"]["run_a"]["no_think"] == PASS["w8a8"][2]


def test_partial_data_leaves_sections_out_and_says_so(runs, tmp_path):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["report", str(runs["w4a8"] / "summary.json"), "--output", str(out), "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert data["perplexity"] is None and data["efficiency"] is None and data["layer_errors"] == {}
    assert len(data["omitted"]) == 3 and any("efficiency.json" in line for line in data["omitted"])
    md = (out / "report.md").read_text()
    assert "## Efficiency" not in md and "## Perplexity" not in md and "## Not in these runs" in md
    assert "no run holds an efficiency.json" in md
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p["file"] for p in data["plots"])


def test_runs_labelled_alike_are_one_model_from_several_folders(tmp_path):
    """As examples/cot_table.py passes them: each setting's code and efficiency folders, one label."""
    for run in ("fp", "w8a8"):
        write(tmp_path / f"code-{run}", "summary.json", code_summary(run))
        write(tmp_path / f"efficiency-{run}", "efficiency.json", efficiency(run))
    write(tmp_path / "ckpt", "qnpu.json", checkpoint_meta("w8a8"))
    folders = [tmp_path / name for name in ("code-fp", "efficiency-fp", "code-w8a8", "efficiency-w8a8", "ckpt")]
    code, stdout, err = run_cli(["report", *map(str, folders), "--labels", "fp,fp,w8a8,w8a8,w8a8", "--output",
                                 str(tmp_path / "r"), "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert [(r["label"], sorted(r["sources"])) for r in data["runs"]] == [
        ("fp", ["code", "efficiency"]), ("w8a8", ["checkpoint", "code", "efficiency"])]
    assert data["code"]["humaneval"]["pass_at_1"] == {run: dict(zip(MODES, PASS[run])) for run in ("fp", "w8a8")}
    assert data["efficiency"]["decode_ms_per_token"] == {run: {"b1 x 128 +32": ms} for run, ms in DECODE.items()}
    assert data["perplexity"]["ppl"] == {"w8a8": PPL["w8a8"]}  # from the checkpoint's quantize report
    code, _, err = run_cli(["report", str(folders[0]), str(folders[2]), "--labels", "fp,fp", "--output",
                            str(tmp_path / "r2")])
    assert code == 2 and "two runs labelled fp hold summary.json" in err


def test_folders_of_the_same_name_without_labels_stay_apart(tmp_path):
    write(tmp_path / "a" / "run", "summary.json", code_summary("fp"))
    write(tmp_path / "b" / "run", "summary.json", code_summary("w4a8"))
    code, stdout, err = run_cli(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--output",
                                 str(tmp_path / "r"), "--json"])
    assert code == 0, err
    assert json.loads(stdout)["code"]["humaneval"]["reference_ppl"] == {"run": REF_PPL["fp"], "run-2": REF_PPL["w4a8"]}


def test_runs_of_different_tasks_get_a_section_each(tmp_path):
    write(tmp_path / "he", "summary.json", code_summary("fp"))
    write(tmp_path / "mb", "summary.json", code_summary("w8a8", task="mbpp"))
    code, stdout, err = run_cli(["report", str(tmp_path / "he"), str(tmp_path / "mb"), "--output",
                                 str(tmp_path / "r"), "--json"])
    assert code == 0, err
    sections = json.loads(stdout)["code"]
    assert {task: list(s["pass_at_1"]) for task, s in sections.items()} == {"humaneval": ["he"], "mbpp": ["mb"]}
    assert sections["mbpp"]["pass_at_1"]["mb"] == dict(zip(MODES, PASS["w8a8"]))
    assert (tmp_path / "r" / "mbpp-pass_at_1.png").is_file()


def test_a_checkpoint_with_only_the_worst_layers_is_plotted_in_model_order(tmp_path):
    write(tmp_path / "old", "qnpu.json", checkpoint_meta("w4a8", complete=False))
    code, stdout, err = run_cli(["report", str(tmp_path / "old"), "--output", str(tmp_path / "r"), "--json"])
    assert code == 0, err
    errors = json.loads(stdout)["layer_errors"]["old"]
    assert not errors["complete"] and len(errors["layers"]) == 5
    assert errors["layers"] == [layer for layer in LAYERS if layer in errors["layers"]]
    assert "Only the 5 worst linears" in (tmp_path / "r" / "report.md").read_text()


def test_a_second_report_into_the_same_folder_replaces_the_first(runs, tmp_path):
    out = tmp_path / "report"
    run_report(runs, out)
    assert (out / "prefill_ms.png").is_file()
    code, _, err = run_cli(["report", str(runs["w4a8"]), "--output", str(out)])
    assert code == 0, err
    assert not (out / "prefill_ms.png").exists() and (out / "layer_errors-run_b.png").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no qnpu results"),
    ("bad_json", "cannot be read as JSON"),
    ("not_a_summary", "has no modes"),
    ("labels", "gives 2 label(s) for 1 run(s)"),
    ("pipe_label", "may not hold '|'"),
    ("bad_structure", "does not have the structure qnpu writes"),
    ("output_is_a_run", "not a qnpu report"),
])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, case, message):
    run, out, extra = runs["fp"], tmp_path / "report", []
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "empty":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "bad_json":
        (run / "eval.json").write_text("{broken")
    elif case == "not_a_summary":
        (run / "summary.json").write_text('{"task": "humaneval"}')
    elif case == "labels":
        extra = ["--labels", "a,b"]
    elif case == "pipe_label":
        extra = ["--labels", "a|b"]
    elif case == "bad_structure":
        broken = efficiency("fp")
        del broken["efficiency"]["prefill"][0]["batch"]
        write(run, "efficiency.json", broken)
    elif case == "output_is_a_run":
        out = runs["w8a8"]
    before = sorted(p.name for p in runs["w8a8"].iterdir())
    code, stdout, err = run_cli(["report", str(run), "--output", str(out), *extra])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and stdout == ""
    assert sorted(p.name for p in runs["w8a8"].iterdir()) == before  # nothing written into a run


def test_a_code_benchmark_run_writes_its_plots_beside_report_md(tmp_path, problems, monkeypatch):  # noqa: F811
    monkeypatch.setattr(suite, "generate", fake_generate)
    monkeypatch.setattr(suite, "reference_nll", lambda m, t, c, r: (1.0, 1))
    probs, info = problems
    for p in probs:
        object.__setattr__(p, "instruction", f"[{p.task_id}] " + p.instruction)
    out = tmp_path / "out"
    summary = suite.run_code_eval(None, CharTokenizer(), probs, task="mbpp", output=out, modes=["no_think"],
                                  generation=GenerationConfig(max_new_tokens=32), limits=Limits(timeout_s=20),
                                  model_info={"name": "tiny"}, data_info=info, progress=False)
    names = [p.rsplit("/", 1)[-1] for p in summary["outputs"]["plots"]]
    assert names == ["pass_at_1.png", "repetition_rate.png", "length_tokens.png"]
    report = (out / "report.md").read_text()
    assert all(f"]({name})" in report and png_size(out / name) == (800, 450) for name in names)
    # the report of this one run reads the same pass@1 back
    data = run_report_one(out, tmp_path / "r")
    assert data["code"]["mbpp"]["pass_at_1"] == {"tiny": {"no_think": summary["modes"]["no_think"]["pass_at_k"]["1"]}}


def run_report_one(folder, out):
    code, stdout, err = run_cli(["report", str(folder), "--labels", "tiny", "--output", str(out), "--json"])
    assert code == 0, err
    return json.loads(stdout)


def test_perplexity_eval_writes_eval_json_that_the_report_reads(tmp_path, monkeypatch):
    import qnpu.jobs as jobs

    monkeypatch.setattr(jobs, "load", lambda model, progress=True: (None, object(), {"name": "m", "kind": "x"}))
    monkeypatch.setattr(jobs, "evaluate", lambda net, tok, slices, n, progress: {
        s: {"ppl": PPL["w4a8"][s], "tokens": 512, "seconds": 0.1} for s in slices})
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["eval", "--slices", "code,docs", "--output", str(out), "--json"])
    assert code == 0, err
    saved = json.loads((out / "eval.json").read_text())
    assert saved["perplexity"] == {s: {"ppl": PPL["w4a8"][s], "tokens": 512, "seconds": 0.1} for s in ("code", "docs")}
    data = run_report_one(out, tmp_path / "r")
    assert data["perplexity"]["ppl"] == {"tiny": {"code": PPL["w4a8"]["code"], "docs": PPL["w4a8"]["docs"]}}
