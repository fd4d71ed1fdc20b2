"""Resumable block forwards: true-sequential calibration in one forward's worth of matmuls.

True-sequential calibration (`qnpu.models.sequential`) needs the input of each group of linears
``[q, k, v] -> [o] -> [gate, up] -> [down]`` with the earlier groups already quantized. Run naively,
each group's pass recomputes the block from its input up to the group (q/k/v and the attention core
three more times, the MLP's gate/up once more) and propagation runs the whole block again: about
3.5 forwards per block, where one-pass calibration runs two (float statistics, quantized output).

A Llama-style block is ``h + attn(norm1(h))`` then ``m + mlp(norm2(m))``, with ``attn`` ending in
o_proj and ``mlp`` in down_proj. Its forward can be resumed at two points from tensors an earlier
pass has seen: the attention module's output is ``o(o_in)`` and the MLP's is ``down(down_in)``. A
`BlockStages` pass keeps, per batch, o_proj's input, the attention output and down_proj's input as
soon as they are computed with final weights, and later passes put a stand-in module in place of
the attention (returning ``o(o_in)``, or the cached output) and of the MLP (``down(down_in)``). The
passes for the four groups and the propagation then compute each linear once: q/k/v and the
attention core for o's statistics, o for gate/up's, gate/up for down's, down for the output.

Cached tensors are only ever produced with final weights, because groups are rounded in the
block's order: a pass to a site computes nothing at or after it, and every linear before the
site is already rounded (or is never rounded). The family's block must match the pattern; the
engine checks it once per run, on the float block 0, against a plain forward
(`BlockStages.verify`), and runs the plain (restarting) passes when it does not match.

Memory: per block, the attention output and down_proj's input for every calibration token (about
``(hidden + intermediate) / hidden`` times the hidden states; o_proj's input lives only until the
attention output replaces it), twice with a float path (GPTAQ). Freed when the block is done.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

from qnpu.transforms import BlockStructure

from .capture import Stop

# the cut points of a block's forward, in order; a group's site is where its linears' input is seen
ATTN_IN, O_IN, MLP_IN, DOWN_IN, OUT = range(5)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


class _StandIn(nn.Module):
    """Returns ``compute()`` in the structure the module it replaces returned (a tensor, or a tuple
    with the tensor first and ``None`` for the rest, e.g. HF attention's ``(output, weights)``)."""

    def __init__(self, compute: Callable[[], torch.Tensor], arity: int | None) -> None:
        super().__init__()
        self.compute, self.arity = compute, arity

    def forward(self, *args, **kwargs):
        out = self.compute()
        return out if self.arity is None else (out,) + (None,) * (self.arity - 1)


@contextlib.contextmanager
def swapped(block: nn.Module, modules: Mapping[str, nn.Module]):
    """``block`` with ``modules`` (block-relative path -> module) put in place for a while."""
    saved = {path: block.get_submodule(path) for path in modules}
    _set_modules(block, modules)
    try:
        yield
    finally:
        _set_modules(block, saved)


def _set_modules(block: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    for path, module in modules.items():
        parent, _, child = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, module)


class BlockStages:
    """Resumable forwards of one family's blocks (module docstring). ``possible`` says whether the
    structure has the pattern at all (o_proj and down_proj each the last linear of a submodule that
    holds q/k/v, resp. gate/up); `verify` checks it on a real block."""

    def __init__(self, structure: BlockStructure) -> None:
        s = structure
        self.structure = s
        self.attn, self.mlp = _parent(s.o), _parent(s.down)
        self.possible = bool(self.attn and self.mlp and self.attn != self.mlp
                             and {_parent(n) for n in (s.q, s.k, s.v)} == {self.attn}
                             and {_parent(n) for n in (s.gate, s.up)} == {self.mlp})
        # the site of each linear's input, and the module whose input marks each site
        self.site_of = {s.q: ATTN_IN, s.k: ATTN_IN, s.v: ATTN_IN, s.o: O_IN, s.gate: MLP_IN, s.up: MLP_IN,
                        s.down: DOWN_IN}
        self.marker = {ATTN_IN: s.q, O_IN: s.o, MLP_IN: s.gate, DOWN_IN: s.down}
        self.arity: dict[str, int | None] = {}  # what the attention / MLP modules return, from `verify`

    def run(self, block: nn.Module, site: int, forward: Callable[[nn.Module], torch.Tensor],
            cache: dict | None) -> torch.Tensor | None:
        """``forward(block)`` up to ``site``: stops (returns None) once the input of the site's marker
        linear has been seen (forward pre-hooks registered before this call see it first), or returns
        the block output for ``OUT``. With ``cache`` (one batch's dict, kept by the caller across the
        passes of one block) the pass resumes from what earlier passes left there and leaves what it
        computes; ``None`` runs the plain forward."""
        hooks, swaps = [], {}
        if cache is not None:
            o, down = block.get_submodule(self.structure.o), block.get_submodule(self.structure.down)
            if site >= MLP_IN and ("attn_out" in cache or "o_in" in cache):
                swaps[self.attn] = _StandIn(lambda: self._attn_out(o, cache), self.arity.get("attn"))
            elif site != OUT:
                hooks.append(o.register_forward_pre_hook(self._keep(cache, "o_in"), prepend=True))
            if site == OUT and "down_in" in cache:
                swaps[self.mlp] = _StandIn(lambda: down(cache["down_in"]), self.arity.get("mlp"))
            elif site != OUT:
                hooks.append(down.register_forward_pre_hook(self._keep(cache, "down_in"), prepend=True))
        if site != OUT:
            hooks.append(block.get_submodule(self.marker[site]).register_forward_pre_hook(self._stop))
        try:
            with swapped(block, swaps):
                return forward(block)
        except Stop:
            return None
        finally:
            for h in hooks:
                h.remove()

    @staticmethod
    def _attn_out(o: nn.Module, cache: dict) -> torch.Tensor:
        if "attn_out" not in cache:
            cache["attn_out"] = o(cache.pop("o_in"))
        return cache["attn_out"]

    @staticmethod
    def _keep(cache: dict, key: str):
        def hook(module, args):
            cache[key] = args[0]
        return hook

    @staticmethod
    def _stop(module, args):
        raise Stop

    def verify(self, block: nn.Module, forward: Callable[[nn.Module], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The plain forward's output of ``block`` on one batch (``forward(block)``), and whether resumed
        passes reproduce it: the passes to o_proj, gate, down_proj, then the output with both
        stand-ins. The plain forward also shows what the attention and MLP modules return, for the
        stand-ins."""
        seen: dict[str, int | None] = {}

        def learn(key: str):
            def hook(module, args, out):  # returns None: the output stays as it is
                seen[key] = len(out) if isinstance(out, tuple) else None
            return hook

        paths = (("attn", self.attn), ("mlp", self.mlp)) if self.possible else ()
        hooks = [block.get_submodule(path).register_forward_hook(learn(key)) for key, path in paths]
        try:
            reference = forward(block)
        finally:
            for h in hooks:
                h.remove()
        if not self.possible:
            return reference, False
        self.arity = seen
        cache: dict = {}
        for site in (O_IN, MLP_IN, DOWN_IN):
            self.run(block, site, forward, cache)
        if not {"attn_out", "down_in"} <= set(cache):
            return reference, False
        out = self.run(block, OUT, forward, cache)
        if out is None or out.shape != reference.shape:
            return reference, False
        scale = float(reference.double().norm())
        return reference, float((out.double() - reference.double()).norm()) <= 1e-5 * max(scale, 1e-30)
