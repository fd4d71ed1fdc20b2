"""The layer-by-layer calibration engine: apply a recipe to a Hugging Face causal LM, block by block.

This is wiring (docs/architecture.md, the layer table); the math lives in `qnpu.transforms`. For every decoder block
``i`` (GPTQ's sequential scheme, Frantar et al. 2022):

1. its inputs ``X_i`` for all calibration sequences are known (block 0's are captured with a
   forward pre-hook on ``layers[0]`` that stops the forward; the keyword arguments Hugging Face
   passes, position embeddings and attention mask, are kept and reused for every block);
2. the *float* block runs on ``X_i`` with forward hooks on its ``nn.Linear`` modules (the only
   hooks in qnpu), accumulating each linear input's `LinearStats` (`capture.SiteStats`):
   ``H = X^T X / n`` (float32 sums of per-batch products; skipped when no transform of the recipe
   reads it, `capture.needs_hessian`), per-channel absmax and a fixed-seed uniform sample of
   ``max_stat_tokens`` rows over all calibration tokens.
   When a transform reads the float path (``"float_path"``, GPTAQ) it is kept too: the float block
   also runs on the float model's own inputs ``X_fp`` (outputs of the float blocks before it),
   giving ``fp_cross = (X_fp - X)^T X / n`` and ``fp_tokens`` (Li et al. 2025);
3. ``recipe.init`` / ``recipe.update`` run on a `BlockView` of the block's params and statistics on
   ``recipe_device`` (default: ``device``; the transforms compute where their inputs are), and the
   result is written back: norm weights in place,
   every linear with a weight or activation spec or an online Hadamard becomes a `QLinear`
   (a static activation spec whose ``(scale, zero_point)`` no ``activation_scales`` step fixed gets
   them from `static_input_qparams` on the block's final statistics, so recipes need not list it);
4. the *quantized* block runs on ``X_i``, giving ``X_{i+1}`` (errors propagate, as at inference).

With ``true_sequential`` (default: on; it applies to recipes that only round, GPTQ, GPTAQ, BiLLM,
SliM-LLM, which block 0 decides from a one-pass run on its first batch), steps 2-4 run once per
group ``[q, k, v] -> [o] -> [gate, up] -> [down]``, each group's statistics taken from the block with
the earlier groups already quantized (`qnpu.models.sequential`), and the passes resume from the
tensors earlier passes computed (`qnpu.models.stages`): each linear runs once per calibration row,
half the forward work of steps 2 and 4. The block error is then measured on the first batch.

What is collected follows what the recipe's transforms declare they read
(`qnpu.transforms.reads_of`; the engine knows no transform by name). A *data-free* recipe, one that
reads nothing (RTN, rotations + RTN, w8a16, w8a8-dynamic), gets the same weights from any
calibration data, so steps 1-4 run on a small error sample only: the first ``error_sample =
(sequences, tokens)`` of the calibration ids (default 8 x 128), which the error report below is
computed from (`QuantizeResult.error_sample_tokens`; all of its rows for the per-linear errors).

Rotations (QuaRot): a block rotated by ``hadamard_rotation`` computes ``x Q -> y Q``. Hidden
states stay in the unrotated basis between blocks (the block gets ``x Q``, its output is
multiplied by ``Q^T``), so every block's view comes in the original basis as the transform
expects; after the last block `rotate_edges` rotates the embedding, final norm and lm_head
(tied embeddings are untied), and the model computes the same function end to end.

Errors recorded per block: the relative output error of the quantized block against the float
block on the same inputs, and per linear ``||X W^T - fq(X) W_hat^T||_F / ||X W^T||_F`` on the
first ``error_tokens`` rows of its stats token sample (data-free: every row of the error sample),
in the block's final basis (``X`` the transformed input sample, ``W`` the transformed float weight
the rounder received, ``W_hat`` its dequantized result, ``fq`` the activation spec).

The models layer is the impure edge: `quantize_model` modifies the model *in place* and returns
the same object.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from qnpu.qcore import QSpec, fake_quantize
from qnpu.transforms import (
    ActivationState,
    BlockStructure,
    BlockView,
    LinearSpec,
    LinearStats,
    QTransform,
    RotationState,
    WeightsState,
    find_states,
    make_view,
    reads_of,
    rotate_edges,
    rotation_matrix,
)
from qnpu.transforms.activations import static_input_qparams

from .capture import SiteStats, Stop, first_output, input_sites, needs_float_path, needs_hessian, to_device
from .families import Family, block_structure, family_for
from .qlinear import QLinear
from .results import BlockResult, QuantizeResult, replaced_linears
from .sequential import SequentialBlocks

# (sequences, tokens) of the calibration ids a data-free recipe's error report is computed on
ERROR_SAMPLE = (8, 128)
FORWARD_DTYPES = (None, torch.bfloat16)  # LayerwiseCalibration(forward_dtype=...)

_OOM_TYPES = (torch.OutOfMemoryError, MemoryError) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)
# what allocators say when they cannot allocate: CUDA / NPU ("out of memory"), torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory" or "not enough memory", a RuntimeError), the OS (ENOMEM)
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says an allocator could not allocate: a `MemoryError` (also a bare one), a
    ``torch.OutOfMemoryError``, or a RuntimeError whose message says so."""
    return isinstance(err, _OOM_TYPES) or (isinstance(err, RuntimeError)
                                           and any(w in str(err).lower() for w in _OOM_WORDS))


@contextlib.contextmanager
def naming_out_of_memory(where: Callable[[], str]):
    """Re-raise an allocation failure (`is_out_of_memory`) as one whose message starts with "out of
    memory while " + ``where()`` and ends with the allocator's own detail on one line: a MemoryError
    or torch.OutOfMemoryError keeps its type, a RuntimeError becomes a RuntimeError (the CLI exits 3 on
    either). An error already named by an inner ``naming_out_of_memory`` passes through unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if getattr(err, "_qnpu_named", False) or not is_out_of_memory(err):
            raise
        detail = " ".join(str(err).split())
        kind = type(err) if isinstance(err, _OOM_TYPES) else RuntimeError
        named = kind(f"out of memory while {where()} ({type(err).__name__}{': ' + detail if detail else ''})")
        named._qnpu_named = True
        raise named from err


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf: one float32 sum (far cheaper than isfinite on bf16; NaN/Inf
    always reach it) and the elementwise check only when the sum overflowed or is not finite."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _check_edge(name: str, t: torch.Tensor) -> None:
    """ValueError naming ``name`` (an embedding, final norm or lm_head weight) when ``t`` has NaN/Inf
    values, with the count of bad rows of a matrix (rows calibration never reads would otherwise be
    saved as they are)."""
    if _all_finite(t):
        return
    bad = ~torch.isfinite(t)
    if t.dim() == 2:
        rows = bad.any(dim=1).nonzero().flatten()
        where = (f" in {rows.numel()} of {t.shape[0]} rows (first: {', '.join(map(str, rows[:5].tolist()))}"
                 f"{', ...' if rows.numel() > 5 else ''})")
    else:
        where = f" ({int(bad.sum())} of {t.numel()})"
    raise ValueError(f"{name} has NaN/Inf values{where}: inspect the checkpoint")


def _run_recipe(recipe: QTransform, view: BlockView) -> tuple[BlockView, Any, dict[str, list]]:
    """Run the recipe and log every tensor it writes through ``with_params`` (in order), so the
    engine knows the float weight each rounder received (the value before its final write)."""
    log: dict[str, list] = {}

    class Recording(BlockView):
        __slots__ = ()

        def with_params(self, updates):
            for key, value in updates.items():
                log.setdefault(key, []).append(value)
            return BlockView.with_params(self, updates)

    recording = Recording(*view)
    state = recipe.init(recording)
    new, state = recipe.update(recording, state)
    return BlockView(*new), state, log


def _merged(states: list, attribute: str) -> dict:
    merged: dict = {}
    for s in states:
        merged.update(getattr(s, attribute))
    return merged


def _relative(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _fq_input(x: torch.Tensor, spec: QSpec | None, qparams) -> torch.Tensor:
    if spec is None:
        return x
    if spec.dynamic:
        return fake_quantize(x, spec)
    scale, zero_point = qparams
    return fake_quantize(x, spec, scale=scale, zero_point=zero_point)


class LayerwiseCalibration(SequentialBlocks):
    """The shared per-block machinery of `quantize_model` and `quantize_from_disk`.

    Holds the hidden states at the current block's input (``[n, seq, hidden]`` on ``device``),
    the float path's when needed, the captured layer kwargs per batch, and the rotation found so
    far. Use: `capture` once, then `step` on every block in order, then `edges`."""

    def __init__(self, recipe: QTransform, family: Family, structure: BlockStructure, *, device="cpu",
                 batch_size: int = 8, max_stat_tokens: int = 2048, block_input_sample: int = 4,
                 error_tokens: int = 128, float_path: bool | None = None, recipe_device=None,
                 hessian: bool | None = None, data_free: bool | None = None,
                 error_sample: tuple[int, int] = ERROR_SAMPLE, true_sequential: bool | None = None,
                 forward_dtype: torch.dtype | None = None) -> None:
        if not isinstance(recipe, QTransform):
            raise TypeError(f"recipe must be a QTransform (e.g. chain(...)); got {type(recipe).__name__}")
        for name, value in (("batch_size", batch_size), ("max_stat_tokens", max_stat_tokens),
                            ("block_input_sample", block_input_sample), ("error_tokens", error_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; allowed: an int >= 1")
        if not (isinstance(error_sample, (tuple, list)) and len(error_sample) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in error_sample)):
            raise ValueError(f"error_sample={error_sample!r}; allowed: (sequences, tokens), two ints >= 1")
        self.recipe, self.family, self.structure = recipe, family, structure
        if forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype={forward_dtype!r}; allowed: None (the model's dtype) or torch.bfloat16")
        self.forward_dtype = forward_dtype
        self.device = torch.device(device)
        self.recipe_device = self.device if recipe_device is None else torch.device(recipe_device)
        self.batch_size, self.max_stat_tokens = batch_size, max_stat_tokens
        self.block_input_sample, self.error_tokens = block_input_sample, error_tokens
        self.float_path = needs_float_path(recipe) if float_path is None else bool(float_path)
        self.hessian = needs_hessian(recipe) if hessian is None else bool(hessian)
        reads = reads_of(recipe)
        calibrated = bool(reads) or self.float_path or self.hessian
        if data_free and calibrated:
            raise ValueError(f"data_free=True, but the recipe reads {', '.join(sorted(reads)) or 'nothing'}"
                             f"{' and the float path / Hessian were asked for' if not reads else ''}: it needs "
                             "the calibration passes (data_free=None decides from what the recipe reads)")
        self.data_free = not calibrated if data_free is None else bool(data_free)
        self.error_sample = tuple(error_sample)
        if true_sequential not in (None, True, False):
            raise ValueError(f"true_sequential={true_sequential!r}; allowed: None (on for recipes that only "
                             "round), True or False")
        # decided on block 0 (`sequential.basis_preserving`): the groups to round one after the other
        self.true_sequential = true_sequential
        # default: on (docs/architecture.md, "True-sequential calibration": as good at W4, better at W3/W2
        # and GPTAQ, and about 0.6x the one-pass time); recipes that rescale or rotate run one pass anyway
        wanted = True if true_sequential is None else true_sequential
        self.sequential = wanted and not self.data_free
        self.groups: tuple[tuple[str, ...], ...] | None = None
        # whether true-sequential passes resume from caches (`stages.BlockStages`; checked on the first block)
        self.stages = None
        self.staged: bool | None = None
        self.hidden: torch.Tensor | None = None
        self.fp_hidden: torch.Tensor | None = None
        self.batches: list[tuple[slice, tuple, dict]] = []
        self.rotation: tuple[int, str] | None = None
        self.blocks_done = 0

    # -- block 0's inputs -------------------------------------------------------------------------
    def capture(self, model: nn.Module, calibration_ids: torch.Tensor) -> None:
        """Run the model's embedding (and whatever precedes layer 0) on every batch of
        ``calibration_ids [n, seq]`` and keep layer 0's inputs and keyword arguments."""
        ids = torch.as_tensor(calibration_ids)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            raise ValueError(f"calibration_ids must be a non-empty integer tensor [n, seq]; got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        if self.data_free:  # the recipe's result does not depend on the data: only the error sample runs
            ids = ids[: self.error_sample[0], : self.error_sample[1]]
        first = model.get_submodule(self.family.layers)[0]
        embed_device = model.get_submodule(self.family.embed).weight.device
        seen: dict = {}

        def hook(module, args, kwargs):
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["args"] = tuple(args[1:])
            seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise Stop

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        hidden = []
        where = f"running the model up to {self.family.layers}.0 on {ids.shape[0]} calibration sequences of " \
                f"{ids.shape[1]} tokens"
        try:
            with naming_out_of_memory(lambda: self.oom_where(where)), torch.no_grad():
                for start in range(0, ids.shape[0], self.batch_size):
                    seen.clear()
                    try:
                        model(input_ids=ids[start:start + self.batch_size].to(embed_device), use_cache=False)
                    except Stop:
                        pass
                    if "hidden" not in seen:
                        raise RuntimeError(f"the model's forward never reached {self.family.layers}.0")
                    rows = slice(start, start + seen["hidden"].shape[0])
                    hidden.append(seen["hidden"].detach().to(self.device))
                    self.batches.append((rows, to_device(seen["args"], self.device),
                                         to_device(seen["kwargs"], self.device)))
        finally:
            handle.remove()
        with naming_out_of_memory(lambda: self.oom_where(where)):
            self.hidden = torch.cat(hidden)
        if not bool(torch.isfinite(self.hidden).all()):
            raise ValueError(f"the inputs of {self.family.layers}.0 (the output of {self.family.embed}) have NaN/Inf "
                             "values: inspect the embedding weights and the model dtype")
        # rows the calibration never read: they would reach the checkpoint unchecked
        _check_edge(f"{self.family.embed}.weight", model.get_submodule(self.family.embed).weight.detach())
        self.fp_hidden = self.hidden.clone() if self.float_path else None

    # -- one block --------------------------------------------------------------------------------
    def step(self, block: nn.Module, index: int) -> BlockResult:
        """Calibrate, transform and replace one block (in place) and advance the hidden states."""
        prefix = f"{self.family.layers}.{index}."
        if self.hidden is None:
            raise RuntimeError("LayerwiseCalibration.step before capture()")
        with naming_out_of_memory(lambda: self.oom_where(f"quantizing block {index}", index)), torch.no_grad():
            return self._step(block, index, prefix)

    @property
    def error_sample_tokens(self) -> int | None:
        """Token rows the per-linear errors are measured on (None before `capture`): every row of
        the error sample when data-free, else the first ``error_tokens`` of the stats' token sample."""
        if self.hidden is None:
            return None
        total = self.hidden.shape[0] * self.hidden.shape[1]
        return total if self.data_free else min(total, self.max_stat_tokens, self.error_tokens)

    def oom_where(self, doing: str, index: int | None = None) -> str:
        """``doing`` (e.g. "quantizing block 3") with the block's name, the device, the calibration
        set and what to lower: the text of `naming_out_of_memory` for this run."""
        block = "" if index is None else f" ({self.family.layers}.{index})"
        data = "" if self.hidden is None else \
            f" with {self.hidden.shape[0]} calibration sequences of {self.hidden.shape[1]} tokens"
        other = "on another device (--device)" if self.device.type == "cpu" else "on the CPU (device='cpu')"
        staged = (", calibrate in one pass (--no-true-sequential: true-sequential blocks keep the attention "
                  "output and down_proj's input of every calibration token)") if self.sequential and self.staged else ""
        return (f"{doing}{block} on {self.device}{data}: lower batch_size (qnpu quantize --batch-size, now "
                f"{self.batch_size}), use fewer calibration samples (--samples) or shorter ones (--seq-len){staged}, "
                f"or calibrate {other}")

    def _forward(self, block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.forward_dtype is None:
            return first_output(block(x, *args, **kwargs))
        # the block's matmuls in bfloat16 (autocast); its output, the statistics and the recipe stay
        # in the model's dtype (docs/architecture.md, "What a calibrated block costs")
        with torch.autocast(self.device.type, dtype=self.forward_dtype):
            return first_output(block(x, *args, **kwargs)).to(x.dtype)

    def _check_params(self, block: nn.Module, prefix: str) -> None:
        for name, p in block.named_parameters():
            if p.is_floating_point() and not _all_finite(p):
                raise ValueError(f"block {prefix.rstrip('.')}: parameter {prefix}{name} has NaN/Inf values; "
                                 "quantization needs finite weights: inspect the checkpoint")

    def _calibrate(self, block: nn.Module, prefix: str, batches: list | None = None
                   ) -> tuple[dict[str, LinearStats], torch.Tensor]:
        """Stats of every linear input of the float block on the current inputs (of ``batches``,
        default all); returns them and the float block's outputs (the reference for the block error).
        Advances the float path."""
        sites = input_sites(self.structure)
        batches = self.batches if batches is None else batches
        total = batches[-1][0].stop * self.hidden.shape[1]
        keep = total if self.data_free else self.max_stat_tokens  # data-free: every error-sample row
        acc = {s: SiteStats(keep, self.hessian, total) for s in set(sites.values())}
        mode: dict = {"phase": None, "fp": {}}

        def make_hook(site):
            def hook(module, inputs, output):
                if mode["phase"] == "fp":
                    mode["fp"][site] = inputs[0]
                elif mode["phase"] == "q":
                    acc[site].add(inputs[0], mode["fp"].pop(site, None))
            return hook

        handles = [block.get_submodule(s).register_forward_hook(make_hook(s)) for s in acc]
        reference = torch.empty_like(self.hidden[: batches[-1][0].stop])
        try:
            for rows, args, kwargs in batches:
                if self.float_path:
                    mode["phase"] = "fp"
                    self.fp_hidden[rows] = self._forward(block, self.fp_hidden[rows], args, kwargs)
                mode["phase"] = "q"
                reference[rows] = self._forward(block, self.hidden[rows], args, kwargs)
                mode["fp"].clear()
        finally:
            for h in handles:
                h.remove()
        site_stats = {s: a.result() for s, a in acc.items()}
        for s, st in site_stats.items():
            if not bool(torch.isfinite(st.absmax).all()):
                raise ValueError(f"the input of {prefix}{s} has NaN/Inf activations on the calibration data "
                                 f"(earlier blocks overflowed?): check the model dtype and the calibration ids")
        return {n: site_stats[sites[n]] for n in self.structure.linears}, reference

    def _write_back(self, block: nn.Module, view: BlockView, original: Mapping[str, torch.Tensor],
                    qweights: dict, act_qparams: dict, only: tuple[str, ...] | None = None) -> None:
        s = self.structure
        spec = {n: view.specs.get(n) or LinearSpec() for n in s.linears}
        replaced = [n for n in replaced_linears(view.specs, view.online_hadamard) if n in spec]
        skip = {f"{n}.{p}" for n in replaced for p in ("weight", "bias")}
        for key, value in view.params.items():
            if key in skip or value is original.get(key):
                continue
            try:
                param = block.get_parameter(key)
            except AttributeError:
                raise ValueError(f"the recipe produced {view.prefix}{key}, for which the model has no parameter "
                                 "(e.g. a bias on a bias-free linear, or scales on a weightless norm)") from None
            param.copy_(value.to(param.device, param.dtype))
        if only is not None:  # true-sequential: this group's linears (earlier groups are QLinears already)
            replaced = [n for n in replaced if n in only]
        unrounded = [view.label(n) for n in replaced if spec[n].weight is not None and n not in qweights]
        if unrounded:
            warnings.warn(f"{unrounded} have weight specs but no rounder in the recipe quantized them; "
                          "their weights stay float (add rtn()/gptq() after quant_specs)", stacklevel=4)
        for n in replaced:
            old = block.get_submodule(n)
            bias = view.params.get(f"{n}.bias")
            new = QLinear(view.params[f"{n}.weight"].to(self.device), None if bias is None else bias.to(self.device),
                          qweight=qweights.get(n), act_spec=spec[n].activation, act_qparams=act_qparams.get(n),
                          online_hadamard=n in view.online_hadamard)
            parent, _, child = n.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new.to(old.weight.device))

    def _rotation_of(self, state, view: BlockView, original: Mapping[str, torch.Tensor], index: int):
        rotations = find_states(state, RotationState)
        key = f"{self.structure.q}.weight"
        rotated = bool(rotations) and view.params[key] is not original[key]
        found = (int(rotations[-1].seed), rotations[-1].kind) if rotated else None
        if bool(rotations) and not rotated:
            raise ValueError(f"block {index}: hadamard_rotation is in the recipe but left this block unrotated; "
                             "the residual rotation must reach every block (don't mask it to some layers)")
        if index > 0 and found != self.rotation:
            raise ValueError(f"block {index} has rotation {found} but earlier blocks {self.rotation}; every "
                             "block must be rotated with the same hadamard_rotation(seed, kind)")
        self.rotation = found
        if found is None:
            return None
        dtype = torch.float64 if self.hidden.dtype == torch.float64 else torch.float32
        return rotation_matrix(self.structure.hidden_size, found[0], found[1], dtype=dtype, device=self.device)

    def _step(self, block: nn.Module, index: int, prefix: str) -> BlockResult:
        start = time.perf_counter()
        home = next(block.parameters()).device
        block.to(self.device)
        self._check_params(block, prefix)
        if self.sequential and self.groups is None:
            # block 0 decides from a one-pass run on the first batch (what the recipe writes does not
            # depend on how much data it saw; `_decide_sequential` sets the groups or turns sequential
            # off); the float path is put back as it was before that run
            fp_before = self.fp_hidden[self.batches[0][0]].clone() if self.float_path else None
            probe = self._one_pass(block, prefix, self.batches[:1])
            if self.float_path:
                self.fp_hidden[self.batches[0][0]] = fp_before
            self._decide_sequential(*probe[1:4])
        if self.sequential:
            done = self._sequential_block(block, prefix)
        else:
            done = self._finish_one_pass(block, index, *self._one_pass(block, prefix))
        original, view, state, errors, qweights, act_qparams, (num, den, bad) = done
        if bad:
            raise ValueError(f"the quantized block {prefix.rstrip('.')} produced NaN/Inf outputs; check the "
                             "recipe's specs for this block (e.g. too few bits or a static scale of 0)")
        state, qweights, act_qparams = self._home(block, home, state, qweights, act_qparams)
        if home != self.device:
            block.to(home)
        params = {k: v.detach() for k, v in block.state_dict(keep_vars=True).items()}
        self.blocks_done += 1
        return BlockResult(index=index, prefix=prefix, specs=dict(view.specs), online_hadamard=view.online_hadamard,
                           state=state, params=params, seconds=time.perf_counter() - start,
                           output_error=_relative(num, den), linear_errors=errors, qweights=qweights,
                           act_qparams=act_qparams)

    @staticmethod
    def _home(block: nn.Module, home: torch.device, state, qweights: dict, act_qparams: dict):
        """The recipe's results moved to the block's own device (they were made on the recipe's), and
        the block's `QLinear`s pointed at the moved ones, so moving the block copies nothing twice."""
        state, qweights, act_qparams = to_device((state, qweights, act_qparams), home)
        for name, module in block.named_modules():
            if isinstance(module, QLinear):
                module.qweight = qweights.get(name, module.qweight)
                module.act_qparams = act_qparams.get(name, module.act_qparams)
        return state, qweights, act_qparams

    def _one_pass(self, block: nn.Module, prefix: str, batches: list | None = None):
        """Float statistics of every linear (on ``batches``, default all), then the recipe on the whole
        block at once."""
        stats, reference = self._calibrate(block, prefix, batches)
        original = {k: v.detach().to(self.recipe_device) for k, v in block.named_parameters()}
        view = make_view(original, self.structure, to_device(stats, self.recipe_device), prefix=prefix,
                         inputs=self.hidden[: self.block_input_sample].to(self.recipe_device))
        view, state, log = _run_recipe(self.recipe, view)
        return original, view, state, log, reference

    def _finish_one_pass(self, block: nn.Module, index: int, original, view, state, log, reference):
        qweights, act_qparams = self._quantized_of(view, state, self.structure.linears)
        q = self._rotation_of(state, view, original, index)
        self._write_back(block, view, original, qweights, act_qparams)
        errors = self._linear_errors(view, original, log, qweights, act_qparams)
        return original, view, state, errors, qweights, act_qparams, self._propagate(block, q, reference)

    def _propagate(self, block: nn.Module, q: torch.Tensor | None, reference: torch.Tensor,
                   run: Callable[[int, torch.Tensor, tuple, dict], torch.Tensor] | None = None):
        """The quantized block on every batch: ``hidden`` advanced to the next block's inputs (in the
        unrotated basis when the block computes in ``x Q``). Returns the squared output error against
        ``reference`` (the float block's outputs on its leading rows: all of them, or the first batch),
        the squared reference and the count of non-finite outputs, summed on the device and read once.
        ``run(batch_index, x, args, kwargs)`` computes the block (default: the plain forward)."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.hidden.device)
        for b, (rows, args, kwargs) in enumerate(self.batches):
            x = self.hidden[rows]
            if q is not None:
                x = (x.to(q.dtype) @ q).to(x.dtype)
            out = self._forward(block, x, args, kwargs) if run is None else run(b, x, args, kwargs)
            if q is not None:
                out = (out.to(q.dtype) @ q.T).to(out.dtype)
            if rows.start < reference.shape[0]:
                ref = reference[rows].double()
                sums[0] += (ref - out[: ref.shape[0]].double()).pow(2).sum()
                sums[1] += ref.pow(2).sum()
            sums[2] += (~torch.isfinite(out)).sum()
            self.hidden[rows] = out
        num, den, bad = sums.tolist()
        return num, den, bad

    def _quantized_of(self, view: BlockView, state, names) -> tuple[dict, dict]:
        """The rounded weights and static input qparams of ``names`` after a recipe run."""
        qweights = {n: t for n, t in _merged(find_states(state, WeightsState), "qweights").items() if n in names}
        act_qparams = {n: t for n, t in _merged(find_states(state, ActivationState), "qparams").items() if n in names}
        for n in names:
            act = view.specs[n].activation if view.specs.get(n) is not None else None
            if act is not None and not act.dynamic and n not in act_qparams:
                # static activation specs need calibrated qparams; computed here, in the final basis
                act_qparams[n] = static_input_qparams(view, n, act)
        return qweights, act_qparams

    def _run_recipe(self, view: BlockView):
        return _run_recipe(self.recipe, view)

    def _linear_errors(self, view: BlockView, original, log, qweights, act_qparams,
                       names: tuple[str, ...] | None = None) -> dict[str, float]:
        errors = {}
        for n in self.structure.linears if names is None else names:
            st = view.stats.get(n)
            if st is None or st.tokens is None:
                continue
            key = f"{n}.weight"
            history = log.get(key, [])
            if n in qweights:  # the rounder's write is the last one; the float weight came before it
                w = history[-2] if len(history) >= 2 else original[key]
            else:
                w = view.params[key]
            x = st.tokens[: self.error_sample_tokens].float()
            spec = view.specs.get(n)
            act = None if spec is None else spec.activation
            ref = x @ w.float().T
            den = float(ref.square().sum(dtype=torch.float64))
            diff = ref.sub_(_fq_input(x, act, act_qparams.get(n)) @ view.params[key].float().T)
            errors[n] = _relative(float(diff.square().sum(dtype=torch.float64)), den)
        return errors

    # -- the model's edges ------------------------------------------------------------------------
    def edges(self, embed: torch.Tensor, final_norm: torch.Tensor | None,
              lm_head: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Final edge tensors by full name: rotated to match the blocks when they are rotated
        (then lm_head gets its own tensor even if it was tied: pass ``lm_head=None`` when tied)."""
        f = self.family
        for name, t in ((f.embed, embed), (f.final_norm, final_norm), (f.lm_head, lm_head)):
            if t is not None:
                _check_edge(f"{name}.weight", t)
        if self.rotation is not None:
            seed, kind = self.rotation
            embed, head, norm = rotate_edges(embed, lm_head, final_norm, seed=seed, kind=kind)
            out = {f"{f.embed}.weight": embed, f"{f.lm_head}.weight": head}
            if norm is not None:
                out[f"{f.final_norm}.weight"] = norm
            return out
        out = {f"{f.embed}.weight": embed}
        if final_norm is not None:
            out[f"{f.final_norm}.weight"] = final_norm
        if lm_head is not None:
            out[f"{f.lm_head}.weight"] = lm_head
        return out


def progress_bar(total: int, progress: bool) -> tqdm:
    return tqdm(total=total, desc="quantizing blocks", unit="block", file=sys.stderr, disable=not progress,
                dynamic_ncols=True)


def _set_param(module: nn.Module, value: torch.Tensor) -> None:
    module.weight = nn.Parameter(value, requires_grad=False)


def quantize_model(model: nn.Module, recipe: QTransform, calibration_ids: torch.Tensor, *, device="cpu",
                   batch_size: int = 8, progress: bool = True, max_stat_tokens: int = 2048,
                   block_input_sample: int = 4, on_block: Callable[[BlockResult], None] | None = None,
                   error_tokens: int = 128, float_path: bool | None = None,
                   recipe_device=None, hessian: bool | None = None, data_free: bool | None = None,
                   error_sample: tuple[int, int] = ERROR_SAMPLE,
                   true_sequential: bool | None = None, forward_dtype: torch.dtype | None = None) -> QuantizeResult:
    """Quantize ``model`` (a supported HF causal LM, see `qnpu.models.families`) with ``recipe``,
    block by block, calibrating on ``calibration_ids [n, seq]`` (module docstring has the flow).

    The model is modified **in place** (blocks' linears become `QLinear`, norms and edges may
    change) and returned as ``result.model``. Each block is moved to ``device`` while it is
    calibrated and back afterwards; the recipe runs on ``recipe_device`` (default: ``device``), and
    its results (quantized weights, static qparams, state) come back with the block. ``on_block``
    is called with each `BlockResult` as soon as the block is done (e.g. to stream it into a
    ``CheckpointWriter`` via `BlockResult.checkpoint_payload`). ``float_path`` (default: whether a transform reads
    ``"float_path"``) keeps the float model's activations for GPTAQ's ``fp_cross``; ``hessian``
    (default: `needs_hessian`, whether a transform reads ``"hessian"``) collects ``X^T X``.
    ``data_free`` (default: whether the recipe reads nothing, `capture.is_data_free`) runs the blocks
    on the first ``error_sample = (sequences, tokens)`` of ``calibration_ids`` only, for the error
    report; the weights are those of a full calibration. ``data_free=False`` calibrates on all of
    ``calibration_ids`` anyway; True for a recipe that reads something is a ValueError.
    ``true_sequential`` (default: on) rounds each block's linears group by group on inputs through the
    earlier quantized groups (`qnpu.models.sequential`) for recipes that only round; recipes that
    rescale or rotate run one pass per block whatever it says (a warning when True).
    ``forward_dtype=torch.bfloat16`` runs the blocks' forward passes (calibration and propagation)
    under bfloat16 autocast; statistics, hidden states and the recipe stay in the model's dtype.

    Raises ValueError naming the block / layer for NaN/Inf weights or activations and for
    inconsistent rotations; out-of-memory errors are re-raised with the block and what to lower.
    """
    start = time.perf_counter()
    family, structure = family_for(model.config), block_structure(model.config)
    run = LayerwiseCalibration(recipe, family, structure, device=device, batch_size=batch_size,
                               max_stat_tokens=max_stat_tokens, block_input_sample=block_input_sample,
                               error_tokens=error_tokens, float_path=float_path, recipe_device=recipe_device,
                               hessian=hessian, data_free=data_free, error_sample=error_sample,
                               true_sequential=true_sequential, forward_dtype=forward_dtype)
    was_training = model.training
    model.eval()
    run.capture(model, calibration_ids)
    layers = model.get_submodule(family.layers)
    blocks = []
    with progress_bar(len(layers), progress) as bar:
        for i, block in enumerate(layers):
            result = run.step(block, i)
            blocks.append(result)
            bar.set_postfix(error=f"{result.output_error:.3g}")
            bar.update()
            if on_block is not None:
                on_block(result)
    embed, norm = model.get_submodule(family.embed), model.get_submodule(family.final_norm)
    head = model.get_submodule(family.lm_head)
    tied = head.weight is embed.weight
    edges = run.edges(embed.weight.detach(), norm.weight.detach(), None if tied else head.weight.detach())
    if run.rotation is not None:
        with torch.no_grad():
            embed.weight.copy_(edges[f"{family.embed}.weight"])
            norm.weight.copy_(edges[f"{family.final_norm}.weight"])
            if tied:
                model.config.tie_word_embeddings = False
                _set_param(head, edges[f"{family.lm_head}.weight"])
            else:
                head.weight.copy_(edges[f"{family.lm_head}.weight"])
        edges = {k: model.get_parameter(k).detach() for k in edges}
    model.train(was_training)
    return QuantizeResult(model=model, blocks=blocks, seconds=time.perf_counter() - start,
                          rotated=run.rotation is not None, edges=edges, config=model.config.to_dict(),
                          data_free=run.data_free, error_sample_tokens=run.error_sample_tokens,
                          true_sequential=run.sequential)
