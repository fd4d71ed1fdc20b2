"""True-sequential calibration inside a block (GPTQ's ``--true-sequential``, Frantar et al. 2022; the
default of GPTQModel and of the GPTAQ authors' driver, Li et al. 2025).

The linears of a block are quantized in four groups, ``[q, k, v] -> [o] -> [gate, up] -> [down]``
(`sequential_groups`). The statistics of each group (Hessian, absmax, token sample and, for GPTAQ,
``fp_cross``) come from a forward pass of the block in which the earlier groups are already
`QLinear`s (their rounded weights and their activation quantizers), so each group is fitted to
the inputs it will see at inference. For a recipe that reads the float path (GPTAQ) the pair is
that of the authors' driver: ``X_fp``, the input in the float model (float blocks before, the float
block itself), and ``X``, the input in the quantized model so far, taken after the linear's own
dynamic activation quantizer when it has one, so ``dX = X_fp - X`` holds the error made inside the
block as well as before it (`docs/architecture.md`, "True-sequential calibration").

It applies to recipes that leave the block's basis alone: their only writes are the rounders'
weights (GPTQ, GPTAQ, RTN with MSE scale search or static activation scales). Recipes that smooth,
scale or rotate (SmoothQuant, AWQ, QuaRot) fix one basis for the whole block from float statistics;
they keep the one-pass path (`basis_preserving` decides, on block 0).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from qnpu.qcore import QSpec, fake_quantize
from qnpu.transforms import BlockStructure, BlockView, RotationState, find_states, make_view

from .capture import SiteStats, input_sites, to_device
from .results import replaced_linears
from .stages import OUT, BlockStages, swapped


def sequential_groups(structure: BlockStructure) -> tuple[tuple[str, ...], ...]:
    """The order in which true-sequential calibration quantizes a block's linears."""
    s = structure
    return ((s.q, s.k, s.v), (s.o,), (s.gate, s.up), (s.down,))


def basis_preserving(state: Any, view: BlockView, log: Mapping[str, list], qweights: Mapping) -> bool:
    """Whether a recipe's run on a block wrote nothing but its rounders' weights (each written once,
    by the rounder): no rotation, no online Hadamard, no smoothing scales in norms or weights. Only
    then can its groups be rounded one after the other on the same params."""
    if find_states(state, RotationState) or view.online_hadamard:
        return False
    rounded = {f"{n}.weight" for n in qweights}
    return all(key in rounded and len(history) == 1 for key, history in log.items())


def dynamic_act_specs(view: BlockView, names) -> dict[str, QSpec]:
    """Linear -> its dynamic activation spec (the quantizer the quantized path applies to its input)."""
    out = {}
    for n in names:
        spec = view.specs.get(n)
        if spec is not None and spec.activation is not None and spec.activation.dynamic:
            out[n] = spec.activation
    return out


class GroupCapture:
    """Streams the statistics of one group's inputs, batch by batch, from forward pre-hooks.

    One accumulator per (input site, own activation spec): q/k/v share their input, and share an
    accumulator unless their activation quantizers differ. In the ``"fp"`` phase a hook keeps the
    float path's input of the batch until the ``"q"`` phase's hook pairs it with the quantized one.
    The pass itself stops at the group's site (`BlockStages.run`)."""

    def __init__(self, structure: BlockStructure, names, *, keep: int, hessian: bool, total: int,
                 act_specs: Mapping[str, QSpec] | None = None) -> None:
        sites = input_sites(structure)
        act_specs = act_specs or {}
        self.key = {n: (sites[n], act_specs.get(n)) for n in names}
        self.acc = {k: SiteStats(keep, hessian, total) for k in dict.fromkeys(self.key.values())}
        self.sites = tuple(dict.fromkeys(site for site, _ in self.acc))
        self.phase, self.fp = None, {}

    def hooks(self, block: torch.nn.Module) -> list:
        return [block.get_submodule(site).register_forward_pre_hook(self._hook(site)) for site in self.sites]

    def _hook(self, site: str):
        def hook(module, inputs):
            x = inputs[0]
            if self.phase == "fp":
                self.fp[site] = x
            elif self.phase == "q":
                fp = self.fp.pop(site, None)
                for (s, spec), acc in self.acc.items():
                    if s == site:
                        acc.add(x if spec is None else fake_quantize(x, spec), fp)
        return hook

    def result(self) -> dict:
        done = {k: a.result() for k, a in self.acc.items()}
        return {n: done[k] for n, k in self.key.items()}


def float_linears(block: torch.nn.Module, floats: Mapping[str, torch.nn.Module]):
    """The block with its float linears put back for a while (the float path's forward)."""
    return swapped(block, floats)


class SequentialBlocks:
    """`LayerwiseCalibration`'s true-sequential steps (it provides ``structure``, ``hidden``,
    ``fp_hidden``, ``batches``, ``_forward``, ``_run_recipe``, ``_quantized_of``, ``_write_back``,
    ``_linear_errors`` and the settings)."""

    def _decide_sequential(self, view: BlockView, state, log) -> bool:
        """On block 0, from the one-pass run: true-sequential when the recipe only rounds (the groups
        are then those of `sequential_groups` cut to the linears it quantizes); else the one-pass path
        for every block, with a warning when true_sequential=True was asked for."""
        qweights, _ = self._quantized_of(view, state, self.structure.linears)
        quantized = set(replaced_linears(view.specs, view.online_hadamard))
        if basis_preserving(state, view, log, qweights) and quantized:
            groups = (tuple(n for n in g if n in quantized) for g in sequential_groups(self.structure))
            self.groups = tuple(g for g in groups if g)
            return True
        self.sequential = False
        if self.true_sequential:
            warnings.warn("true_sequential=True, but the recipe rescales or rotates the block (or quantizes "
                          "nothing): its groups cannot be rounded one after the other; calibrating each block "
                          "in one pass", stacklevel=5)
        return False

    def _sequential_block(self, block: torch.nn.Module, prefix: str):
        """Round the groups one after the other, each on statistics of the block with the earlier groups
        quantized (module docstring), then propagate. The passes resume from per-batch caches
        (`BlockStages`) when the family's block was verified to allow it. Returns what
        `_finish_one_pass` returns; the block output error is measured on the first batch."""
        s = self.structure
        floats = {n: block.get_submodule(n) for n in s.linears}
        original = {k: v.detach().to(self.recipe_device) for k, v in block.named_parameters()}
        view = make_view(original, s, {}, prefix=prefix,
                         inputs=self.hidden[: self.block_input_sample].to(self.recipe_device))
        reference = self._staged_reference(block)
        # one dict per batch while passes resume from caches, None while they restart
        caches = [{} if self.staged else None for _ in self.batches]
        fp_caches = [{} if self.staged else None for _ in self.batches]
        states, errors, qweights, act_qparams = [], {}, {}, {}
        for names in self.groups:
            stats = self._capture_group(block, floats, names, caches, fp_caches, prefix=prefix)
            new, state, log = self._run_recipe(view.with_stats(stats)._replace(targets=names))
            acts = dynamic_act_specs(new, names) if self.float_path else {}
            if acts:  # GPTAQ's X is the input after the linear's own quantizer, known once the specs are
                stats = self._capture_group(block, floats, names, caches, fp_caches, acts, prefix=prefix)
                new, state, log = self._run_recipe(view.with_stats(stats)._replace(targets=names))
            rounded, static = self._quantized_of(new, state, names)
            if not basis_preserving(state, new, log, rounded):
                raise ValueError(f"block {prefix.rstrip('.')}: the recipe rescales or rotates this block but not "
                                 "block 0; true-sequential calibration needs the same kind of recipe on every "
                                 "block (pass true_sequential=False)")
            self._write_back(block, new, original, rounded, static, only=names)
            errors.update(self._linear_errors(new, original, log, rounded, static, names))
            qweights.update(rounded)
            act_qparams.update(static)
            states.append(state)
            view = new._replace(targets=s.linears)
        if self.float_path:  # advance the float path: the float block on its own inputs
            with float_linears(block, floats):
                for b, (rows, args, kwargs) in enumerate(self.batches):
                    self.fp_hidden[rows] = self._pass(block, OUT, self.fp_hidden[rows], args, kwargs, fp_caches[b])
        sums = self._propagate(block, None, reference, lambda b, x, args, kwargs: self._pass(
            block, OUT, x, args, kwargs, caches[b]))
        return original, view, tuple(states), errors, qweights, act_qparams, sums

    def _pass(self, block: torch.nn.Module, site: int, x: torch.Tensor, args: tuple, kwargs: dict,
              cache: dict | None) -> torch.Tensor | None:
        return self.stages.run(block, site, lambda b: self._forward(b, x, args, kwargs), cache)

    def _staged_reference(self, block: torch.nn.Module) -> torch.Tensor:
        """The float block's output on the first batch (the block error's reference); on the first
        true-sequential block also decides whether passes may resume from caches (`BlockStages.verify`)."""
        rows, args, kwargs = self.batches[0]
        x = self.hidden[rows]
        if self.staged is not None:
            return self._forward(block, x, args, kwargs)
        self.stages = BlockStages(self.structure)
        reference, self.staged = self.stages.verify(block, lambda b: self._forward(b, x, args, kwargs))
        if not self.staged and self.stages.possible:
            warnings.warn(f"{type(block).__name__}: resuming its forward from o_proj / down_proj inputs did "
                          "not reproduce the block's output; true-sequential calibration re-runs the block "
                          "from its input for every group (slower, same result)", stacklevel=5)
        return reference

    def _capture_group(self, block: torch.nn.Module, floats, names, caches, fp_caches, act_specs=None, *,
                       prefix: str = "") -> dict:
        """Statistics of ``names``' inputs on every batch: the float path's (float linears, ``fp_hidden``)
        paired with the quantized path's (the block as it is now, ``hidden``), each pass stopping at
        the group's site."""
        total = self.hidden.shape[0] * self.hidden.shape[1]
        cap = GroupCapture(self.structure, names, keep=self.max_stat_tokens, hessian=self.hessian, total=total,
                           act_specs=act_specs)
        site = self.stages.site_of[names[0]]
        handles = cap.hooks(block)
        try:
            for b, (rows, args, kwargs) in enumerate(self.batches):
                if self.float_path:
                    cap.phase = "fp"
                    with float_linears(block, floats):
                        self._pass(block, site, self.fp_hidden[rows], args, kwargs, fp_caches[b])
                cap.phase = "q"
                self._pass(block, site, self.hidden[rows], args, kwargs, caches[b])
        finally:
            for h in handles:
                h.remove()
        stats = cap.result()
        for n, st in stats.items():
            if not bool(torch.isfinite(st.absmax).all()):
                raise ValueError(f"the input of {prefix}{n} has NaN/Inf activations on the calibration "
                                 "data (earlier blocks overflowed?): check the model dtype and the calibration ids")
        return to_device(stats, self.recipe_device)
