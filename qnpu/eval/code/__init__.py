"""Code benchmarks (HumanEval, MBPP): generation with CoT modes, sandboxed execution, pass@k,
reference-solution perplexity and output analysis. See docs/architecture.md, "Evaluation suite"."""
from qnpu.eval.code.extract import extract_code, humaneval_program, strip_reasoning
from qnpu.eval.code.generate import GenerationConfig, Sample, generate, reference_nll
from qnpu.eval.code.metrics import distribution, pass_at_k, repetition_loop
from qnpu.eval.code.prompts import COT_MODES, build_prompt, check_cot, template_style
from qnpu.eval.code.sandbox import Limits, SandboxResult, isolation, run_program
from qnpu.eval.code.suite import run_code_eval
from qnpu.eval.code.tasks import TASKS, DataError, Problem, load_problems, read_jsonl

__all__ = ["COT_MODES", "TASKS", "DataError", "GenerationConfig", "Limits", "Problem", "Sample", "SandboxResult",
           "build_prompt", "check_cot", "distribution", "extract_code", "generate", "humaneval_program",
           "isolation", "load_problems", "pass_at_k", "read_jsonl", "reference_nll", "repetition_loop",
           "run_code_eval", "run_program", "strip_reasoning", "template_style"]
