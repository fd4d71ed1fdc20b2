"""qnpu models as lm-evaluation-harness models (`qnpu.eval.lm_eval_model`, `qnpu lm-eval`).

The scores are checked against plain torch on a tiny random Llama with a small byte-level BPE
tokenizer (so contexts and continuations can merge across their boundary), as a Hugging Face folder
and as a simulated qnpu checkpoint; the offline tasks in tests/fixtures/lm_eval_task run end to end
through the CLI."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from qnpu.models import quantize_model, save_quantized
from qnpu.transforms import recipes
from tests.eval.fakes import run_cli

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qnpu.eval.lm_eval_model import QnpuLM  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval_task"
EOS = "<|endoftext|>"


def tiny_tokenizer():
    """A byte-level BPE (at most 1000 tokens) trained on the fixture texts, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for f in sorted(TASKS.glob("*.jsonl")) for line in f.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"hf": folder, "ckpt": simulated w8a8-dynamic checkpoint}`` of one tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm_eval_models")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    ids = torch.randint(0, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize_model(LlamaForCausalLM.from_pretrained(root / "hf").eval(), recipes.get("w8a8-dynamic"),
                                ids, progress=False)
    save_quantized(result, root / "ckpt", source={"name": "tiny"}, recipe=recipes.get("w8a8-dynamic"),
                   tokenizer=tok)
    return {"hf": root / "hf", "ckpt": root / "ckpt"}


@pytest.fixture(scope="module")
def lms(models):
    """One `QnpuLM` per model kind, built once (batch size 3: several padded rows per batch)."""
    return {kind: QnpuLM(pretrained=str(path), batch_size=3, max_length=128) for kind, path in models.items()}


PAIRS = [("Question: Which planet is closest to the Sun?\nAnswer:", " Mercury"),
         ("Question: Which planet is closest to the Sun?\nAnswer:", " Venus and Mars, not Jupiter"),
         ("The quick brown fox ", "jumps over the lazy dog."),  # trailing space moves to the continuation
         ("def add(a, b):\n", "    return a + b"),
         ("", "Quantization maps real numbers"),  # empty context: the prefix token conditions
         ("x", "y"),
         ("Quantization maps real num", "bers onto a small set")]  # a word split between the two


def requests(kind: str, args) -> list:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def logprobs(lm, ids: list[int]) -> torch.Tensor:
    """Plain torch: ``log p(ids[i] | ids[:i])`` for i >= 1, one forward pass, no padding."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def expected_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """The definition: the context's trailing spaces belong to the continuation; the continuation's
    tokens are those of ``tok(context + continuation)`` after ``len(tok(context))``, scored after
    ``tok(context)``; an empty context is the prefix (EOS) token. Sum of log-softmax over those
    tokens; greedy when each is the argmax."""
    tok = lm.tokenizer
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    if context:
        ctx = tok(context)["input_ids"]
        cont = tok(context + continuation)["input_ids"][len(ctx):]
    else:
        ctx, cont = [tok.eos_token_id], tok(continuation)["input_ids"]
    seq = ctx + cont
    lp = logprobs(lm, seq)[len(ctx) - 1:]
    with torch.no_grad():
        logits = lm.model(torch.tensor([seq])).logits[0, len(ctx) - 1:-1]
    return float(lp.sum()), bool((logits.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.parametrize("kind", ["hf", "ckpt"])
def test_loglikelihood_is_the_sum_of_log_softmax_over_the_continuation_tokens(lms, kind):
    lm = lms[kind]
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (value, greedy) in zip(PAIRS, got):
        want, want_greedy = expected_loglikelihood(lm, context, continuation)
        assert value == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy == want_greedy


def test_the_fixture_tokenizer_merges_across_the_boundary(lms):
    """Two of PAIRS tokenize differently apart than together, so a boundary taken from the
    continuation's own encoding (or the context's trailing space kept) would score other tokens."""
    tok = lms["hf"].tokenizer
    for context, continuation in (PAIRS[2], PAIRS[6]):
        assert tok(context)["input_ids"] + tok(continuation)["input_ids"] != tok(context + continuation)["input_ids"]


def test_the_greedy_flag_is_true_exactly_for_the_argmax_continuation(lms):
    """On token ids (random greedy tokens need not survive a decode / encode round trip): the three
    greedy tokens are flagged greedy, the same with the last one replaced by the runner-up not."""
    lm = lms["ckpt"]
    ctx = lm.tokenizer("Question: How many legs does a spider have?\nAnswer:")["input_ids"]
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
        runner_up = int(lm.model(torch.tensor([ids[:-1]])).logits[0, -1].topk(2).indices[1])
    greedy, other = ids[len(ctx):], ids[len(ctx):-1] + [runner_up]
    got = lm._loglikelihood_tokens([(("a", "b"), ctx, greedy), (("a", "c"), ctx, other)], disable_tqdm=True)
    assert [flag for _, flag in got] == [True, False]
    assert got[0][0] == pytest.approx(float(logprobs(lm, ids)[-3:].sum()), abs=1e-4)
    assert got[1][0] == pytest.approx(float(logprobs(lm, ctx + other)[-3:].sum()), abs=1e-4)
    assert got[1][0] < got[0][0]


def test_batching_does_not_change_the_scores(models, lms):
    one = QnpuLM(pretrained=str(models["ckpt"]), batch_size=1, max_length=128)
    reqs = requests("loglikelihood", PAIRS)
    alone, batched = (lm.loglikelihood(reqs, disable_tqdm=True) for lm in (one, lms["ckpt"]))
    assert [v for v, _ in alone] == pytest.approx([v for v, _ in batched], abs=1e-5)
    assert [g for _, g in alone] == [g for _, g in batched]


@pytest.mark.parametrize("kind", ["hf", "ckpt"])
def test_rolling_loglikelihood_is_the_full_sequence_log_likelihood(lms, kind):
    lm = lms[kind]
    texts = [json.loads(line)["text"] for line in (TASKS / "text.jsonl").read_text().splitlines()]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got):
        ids = [lm.tokenizer.eos_token_id] + lm.tokenizer(text)["input_ids"]
        assert len(ids) <= lm.max_length  # one window
        assert value == pytest.approx(float(logprobs(lm, ids).sum()), abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_the_stop_sequence_or_the_token_limit(lms):
    lm = lms["ckpt"]
    prompts = ["Q: What is two plus two?\nA:", "def add(a, b):\n"]
    for until, limit in ((["e"], 12), ([], 5)):
        got = lm.generate_until(requests("generate_until", [(p, {"until": until, "max_gen_toks": limit,
                                                                 "do_sample": False}) for p in prompts]),
                                disable_tqdm=True)
        cut = 0
        for prompt, text in zip(prompts, got):
            ids = lm.tokenizer(prompt)["input_ids"]
            new = []
            with torch.no_grad():
                while len(new) < limit:
                    nxt = int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                    if nxt == lm.tokenizer.eos_token_id:
                        break
                    new.append(nxt)
            want = lm.tokenizer.decode(new)
            for stop in until:
                want = want.split(stop)[0]
            cut += want != lm.tokenizer.decode(new) if until else len(new) == limit
            assert text == want, (until, prompt)
        assert cut  # the stop string (then the token limit) did cut at least one answer short


def test_a_lowered_reference_model_scores_close_to_the_simulated_one(models, lms):
    low = QnpuLM(pretrained=str(models["ckpt"]), lowered="reference", batch_size=3, max_length=128)
    assert type(low.model.model.layers[0].mlp.down_proj).__name__ == "W8A8DynamicLinear"
    reqs = requests("loglikelihood", PAIRS)
    simulated = [v for v, _ in lms["ckpt"].loglikelihood(reqs, disable_tqdm=True)]
    lowered = [v for v, _ in low.loglikelihood(reqs, disable_tqdm=True)]
    # W8A8-dynamic layers are within 1e-5 of their QLinear (docs/architecture.md, "Bounds"); the
    # float model is 2.4e-3 away from the simulated one on these pairs, so the bound tells them apart
    assert lowered == pytest.approx(simulated, rel=0, abs=5e-4)


def test_model_arguments_are_checked(models):
    with pytest.raises(ValueError, match="lowered: target='nowhere' does not exist"):
        QnpuLM(pretrained=str(models["hf"]), lowered="nowhere")
    with pytest.raises(ValueError, match="lowered=reference needs a qnpu checkpoint; hf has no quantized"):
        QnpuLM(pretrained=str(models["hf"]), lowered="reference")
    with pytest.raises(ValueError, match="device"):
        QnpuLM(pretrained=str(models["hf"]), device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        QnpuLM(pretrained=str(models["hf"]), dtype="float8")


def test_registered_as_qnpu_for_lm_eval(models):
    from lm_eval.api.registry import get_model

    assert get_model("qnpu") is QnpuLM
    lm = QnpuLM.create_from_arg_string(f"pretrained={models['hf']},max_length=64", {"batch_size": 2})
    assert lm.max_length == 64 and lm.batch_size == 2


def test_the_offline_tasks_run_end_to_end_through_the_cli(models, tmp_path):
    out = tmp_path / "results"
    code, stdout, stderr = run_cli(["lm-eval", str(models["ckpt"]), "--tasks", "qnpu_tiny_mc,qnpu_tiny_gen,qnpu_tiny_text",
                                    "--include-path", str(TASKS), "--batch-size", "4", "--output", str(out), "--json"])
    assert code == 0, stderr
    data = json.loads(stdout)
    mc = data["tasks"]["qnpu_tiny_mc"]
    assert mc["samples"] == 8 and 0 <= mc["metrics"]["acc"] <= 1 and 0 <= mc["metrics"]["acc_norm"] <= 1
    assert data["tasks"]["qnpu_tiny_gen"]["samples"] == 4
    assert 0 <= data["tasks"]["qnpu_tiny_gen"]["metrics"]["exact_match"] <= 1
    assert data["tasks"]["qnpu_tiny_text"]["metrics"]["word_perplexity"] > 1
    full = json.loads((out / "results.json").read_text())
    assert full["results"]["qnpu_tiny_mc"]["acc,none"] == mc["metrics"]["acc"]
    assert full["n-samples"]["qnpu_tiny_mc"]["effective"] == 8
    assert full["config"]["model"] == str(models["ckpt"].resolve()) and full["config"]["batch_size"] == 4
    rows = [json.loads(line) for line in (out / "samples_qnpu_tiny_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sum(r["acc"] for r in rows) / 8 == mc["metrics"]["acc"]
    assert "qnpu_tiny_mc" in (out / "results.md").read_text()


def test_the_cli_table_limit_and_lowered_target(models, tmp_path):
    import random

    import numpy as np

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = random.random(), np.random.rand(), torch.rand(1)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    code, stdout, stderr = run_cli(["lm-eval", str(models["ckpt"]), "--tasks", "qnpu_tiny_mc", "--include-path",
                                    str(TASKS), "--limit", "3", "--num-fewshot", "1", "--lowered", "reference",
                                    "--output", str(tmp_path / "r")])
    assert code == 0, stderr
    assert "qnpu_tiny_mc" in stdout and "acc" in stdout and "3 of 8" in stdout and "reference" in stdout
    full = json.loads((tmp_path / "r" / "results.json").read_text())
    assert full["n-samples"]["qnpu_tiny_mc"] == {"original": 8, "effective": 3}
    assert full["configs"]["qnpu_tiny_mc"]["num_fewshot"] == 1
    assert (random.random(), np.random.rand(), torch.rand(1)) == before  # the global generators left alone


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "qnpu_tiny_nope"], "unknown task qnpu_tiny_nope"),
    (["--tasks", ""], "--tasks"),
    (["--tasks", "qnpu_tiny_mc", "--limit", "0"], "--limit"),
    (["--tasks", "qnpu_tiny_mc", "--lowered", "nowhere"], "--lowered"),
    (["--tasks", "qnpu_tiny_mc", "--device", "tpu"], "device"),
    (["--tasks", "qnpu_tiny_mc", "--model-args", "pretrained=x"], "--model-args pretrained is not an argument"),
    (["--tasks", "qnpu_tiny_mc", "--dtype", "float8"], "--dtype float8"),
])
def test_bad_cli_input_is_one_line_and_exit_2(models, tmp_path, monkeypatch, argv, needle):
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__  # lm-eval's own ~15,000 tasks take ~20 s to index: leave them out here
    monkeypatch.setattr(TaskManager, "__init__", lambda self, **kw: init(self, **{**kw, "include_defaults": False}))
    code, _, stderr = run_cli(["lm-eval", str(models["hf"]), "--include-path", str(TASKS),
                               "--output", str(tmp_path / "r"), *argv])
    assert code == 2 and stderr.startswith("qnpu lm-eval: error:") and needle in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_output_that_is_a_file_exits_2(models, tmp_path):
    (tmp_path / "f").write_text("keep")
    code, _, stderr = run_cli(["lm-eval", str(models["hf"]), "--tasks", "qnpu_tiny_mc", "--include-path", str(TASKS),
                               "--output", str(tmp_path / "f")])
    assert code == 2 and "is a file" in stderr and (tmp_path / "f").read_text() == "keep"


def test_a_bad_model_path_and_a_bad_include_path_exit_2(tmp_path):
    code, _, stderr = run_cli(["lm-eval", str(tmp_path / "missing"), "--tasks", "qnpu_tiny_mc",
                               "--include-path", str(TASKS)])
    assert code == 2 and "does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli(["lm-eval", "default", "--tasks", "x", "--include-path", str(tmp_path / "none")])
    assert code == 2 and "--include-path" in stderr and len(stderr.strip().splitlines()) == 1
