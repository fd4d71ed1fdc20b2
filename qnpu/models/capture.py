"""The calibration data flow of the engine: what a recipe needs, and running statistics of linear inputs.

What a recipe needs is what its transforms declare they read (`qnpu.transforms.reads_of`); the
models layer keeps no list of transform names.

`SiteStats` accumulates one linear input's `LinearStats` from forward hooks, batch by batch:
``H = X^T X / n`` (the GPTQ proxy Hessian, Frantar et al. 2022; float32 sums of per-batch
products), per-channel absmax, a fixed-seed uniform sample of ``max_tokens`` rows over all
calibration tokens (searches such as AWQ's score on it), and with a float path GPTAQ's
``fp_cross = (X_fp - X)^T X / n`` and float rows (Li et al. 2025).
"""
from __future__ import annotations

import dataclasses

import torch

from qnpu.transforms import BlockStructure, LinearStats, QTransform, reads_of


def needs_hessian(recipe: QTransform) -> bool:
    """Whether ``recipe`` reads ``LinearStats.hessian`` (its declared `reads_of`): collecting it costs
    about one more forward pass per block (``X^T X`` for every linear input). A transform without a
    declaration may read anything, so it gets the Hessian."""
    return "hessian" in reads_of(recipe)


def needs_float_path(recipe: QTransform) -> bool:
    """Whether ``recipe`` reads the float path (``fp_tokens`` / ``fp_cross``, GPTAQ): one more
    float forward pass per block on the float model's own inputs."""
    return "float_path" in reads_of(recipe)


def is_data_free(recipe: QTransform) -> bool:
    """Whether ``recipe`` reads no calibration data at all (e.g. RTN, rotations + RTN): its result is a
    function of the weights only, so the engine runs no calibration passes for it."""
    return not reads_of(recipe)


class Stop(Exception):
    """Raised by the capture hook to end the forward once layer 0's inputs are known."""


def to_device(obj, device, _memo: dict | None = None):
    """``obj`` with every tensor moved to ``device``: tensors, named tuples (states, `LinearStats`),
    lists, tuples, dicts and frozen dataclasses holding tensors (`QTensor`, `BiLLMTensor`,
    `MixedTensor`). An object reached twice (a `WeightsState`'s QTensor also listed on its own) is
    moved once and stays shared; anything already on ``device`` is returned as it is."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to(device)
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        out = type(obj)(*(to_device(v, device, memo) for v in obj))
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(to_device(v, device, memo) for v in obj)
    elif isinstance(obj, dict):
        out = {k: to_device(v, device, memo) for k, v in obj.items()}
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {f.name: to_device(getattr(obj, f.name), device, memo) for f in dataclasses.fields(obj) if f.init}
        same = all(moved[k] is getattr(obj, k) for k in moved)
        out = obj if same else dataclasses.replace(obj, **moved)
    else:
        return obj
    memo[id(obj)] = out
    return out


def first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


GRAM_BLOCK = 192


def add_upper_gram(gram: torch.Tensor, rows: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """``gram += rows^T rows`` on the upper triangle only (block rows of ``block`` columns and the
    blocks right of the diagonal); entries below the diagonal blocks are left as they were and
    `mirror_upper` fills them. About (k+1)/2k of the full product's work for k blocks (the
    calibration pass's largest cost after the forward itself); each upper entry is the same dot
    product over the same rows as in the full product, so the result agrees with it to float32
    rounding, and comes out exactly symmetric."""
    width = rows.shape[1]
    if width <= block:
        gram.addmm_(rows.T, rows)
        return
    for i in range(0, width, block):
        gram[i:i + block, i:].addmm_(rows[:, i:i + block].T, rows[:, i:])


def mirror_upper(gram: torch.Tensor) -> None:
    """Copy the strict upper triangle of ``gram`` onto the lower one (in place)."""
    upper = torch.triu(gram, diagonal=1)
    gram.copy_(upper + upper.T + torch.diag_embed(torch.diagonal(gram)))


class SiteStats:
    """Running `LinearStats` of one linear input (shared by the linears that read it); with
    ``hessian=False`` the ``X^T X`` sum is skipped and ``LinearStats.hessian`` is None."""

    def __init__(self, max_tokens: int, hessian: bool = True, total_rows: int | None = None) -> None:
        self.max_tokens, self.hessian = max_tokens, hessian
        # which rows the token sample keeps: with ``total_rows`` known, a fixed-seed uniform sample
        # over all calibration tokens (every sequence and position, sequence starts at their true
        # 1-in-seq_len rate); without it, the first ``max_tokens`` rows. Drawn on the CPU, so every
        # device keeps the same rows.
        self.keep = None
        if total_rows is not None and total_rows > max_tokens:
            gen = torch.Generator(device="cpu").manual_seed(0)
            pick = torch.randperm(total_rows, generator=gen, device="cpu")[:max_tokens]
            self.keep = torch.sort(pick).values
        self.n = 0
        self.gram = self.cross = self.absmax = None
        self.tokens: list[torch.Tensor] = []
        self.fp_tokens: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor, fp_x: torch.Tensor | None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        # float32 sums of per-batch products: a few dozen terms per entry, no float64 needed
        if not self.hessian:
            pass
        else:
            if self.gram is None:
                self.gram = rows.new_zeros(rows.shape[1], rows.shape[1])
            add_upper_gram(self.gram, rows)
        amax = rows.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.keep is None:
            take = max(0, min(self.max_tokens - self.kept, rows.shape[0]))
            index = torch.arange(take, device=rows.device)
        else:
            inside = self.keep[(self.keep >= self.n) & (self.keep < self.n + rows.shape[0])]
            index, take = (inside - self.n).to(rows.device), inside.numel()
        if take:
            self.tokens.append(rows[index])
        if fp_x is not None:
            fp_rows = fp_x.detach().reshape(-1, x.shape[-1]).float()
            if self.cross is None:
                self.cross = (fp_rows - rows).T @ rows
            else:
                self.cross.addmm_((fp_rows - rows).T, rows)
            if take:
                self.fp_tokens.append(fp_rows[index])
        self.kept += take
        self.n += rows.shape[0]

    def result(self) -> LinearStats:
        def mean(t):
            return None if t is None else t.div_(self.n)

        # on the device the inputs came on; the engine moves them to the recipe's device
        if self.gram is not None:
            mirror_upper(self.gram)
        return LinearStats(hessian=mean(self.gram), absmax=self.absmax, tokens=torch.cat(self.tokens),
                           fp_tokens=torch.cat(self.fp_tokens) if self.fp_tokens else None,
                           fp_cross=mean(self.cross))


def input_sites(structure: BlockStructure) -> dict[str, str]:
    """Linear -> the linear whose input it shares (readers of one RMSNorm share one input)."""
    site = {n: n for n in structure.linears}
    for _, readers in structure.norm_pairs:
        for r in readers:
            site[r] = readers[0]
    return site

