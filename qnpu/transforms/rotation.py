"""QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"): rotate the
residual stream by an orthogonal matrix so that activation outliers are spread over all channels.

For one orthogonal ``Q [hidden, hidden]`` shared by every block, the rotated residual stream is
``x' = x Q``. RMSNorm without a weight commutes with ``Q`` (``||x Q|| = ||x||``), so first each
norm weight ``g`` is folded into the linears that read it (``W <- W diag(g)``, ``g <- 1``); then

    readers (q, k, v, gate, up):  W <- W Q                       ([out, hidden])
    writers (o, down):            W <- Q^T W,  b <- Q^T b        ([hidden, in])

and ``block'(x Q) == block(x) Q``. Two more rotations leave the block output unchanged:

* per head (``per_head``): with ``H_h = hadamard(head_dim) / sqrt(head_dim)``, every kv head's
  value rows become ``H_h W_v`` (bias ``H_h b_v``) and every query head's block of o's input
  columns ``W_o H_h^T``; attention is linear in V, so each head's output is rotated by ``H_h``
  and o undoes it. Offline: folded into the weights.
* online before down_proj (``online``): ``W_down <- W_down H^T`` with ``H`` the normalized
  Hadamard of ``intermediate_size``; the runtime must apply ``hadamard_transform`` to down's
  input (``x -> x H^T``), which the state records as ``online`` and `block_forward`'s
  ``online_hadamard`` simulates. Targets that cannot run online rotations use ``online=False``.

Per-head q/k norms (Qwen3) act on q/k outputs, which the residual rotation leaves unchanged.

Statistics follow each linear's new input ``X' = X R``: ``H' = R^T H R``, ``tokens' = tokens R``
(``fp_tokens``, ``fp_cross`` likewise), with ``R = diag(1/g) Q`` for readers, the per-head
Hadamard for o and ``H^T`` for down. ``absmax'`` is recomputed from the rotated token sample: it is
exact when the sample holds every calibration row and otherwise a *lower bound* of the true
absmax; without tokens it is None (unknown).

The model edges are not a block: use `rotate_edges` on the embedding, final norm and lm_head.
Later steps in the same chain see the rotated block; `block_forward` on it needs
``online_hadamard=state.online``, and channel scaling of down's input (SmoothQuant's up -> down
pair) is no longer exact behind the online Hadamard.

Each block's view must come in the original basis (params, stats and ``inputs``); the transform
returns it in the rotated basis (``inputs' = inputs Q``). A layer-by-layer engine therefore
feeds every block unrotated hidden states (e.g. ``y' Q^T``), or it would rotate twice.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from qnpu.qcore import hadamard_transform, is_hadamard_order, random_hadamard

from .base import QTransform, register_state, register_transform
from .checks import check_choice, check_flags, check_int
from .view import BlockView, LinearStats, TransformError, fail

NAME = "hadamard_rotation"
KINDS = ("hadamard", "orthogonal")


@register_state
class RotationState(NamedTuple):
    """What rebuilds the rotation: ``rotation_matrix(hidden, seed, kind)`` (not stored: one dense
    ``[hidden, hidden]`` per block would cost memory); ``online``: linears whose input the runtime
    must pass through ``hadamard_transform``; ``per_head``: whether V/O carry the head Hadamard."""

    seed: int
    kind: str
    online: tuple = ()
    per_head: bool = True


def _check_kind(kind: str) -> None:
    check_choice(NAME, "kind", kind, KINDS)


@functools.lru_cache(maxsize=4)
def _rotation64(hidden: int, seed: int, kind: str, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    # Cached because every block of a model asks for the same matrix; callers never write to it.
    # Computed on the CPU and moved, so every device gets the same matrix (docs/architecture.md, "Devices").
    if device.type != "cpu":
        return _rotation64(hidden, seed, kind).to(device)
    if kind == "hadamard":
        return random_hadamard(hidden, seed, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64, device=device))
    # Fixing the signs of diag(R) makes Q unique, hence Haar-distributed (Mezzadri 2007).
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def rotation_matrix(hidden: int, seed: int = 0, kind: str = "hadamard", *,
                    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The residual rotation ``Q [hidden, hidden]`` (``Q Q^T = I``), a function of its arguments only.

    ``"hadamard"``: ``hadamard(hidden) diag(random_signs(hidden, seed)) / sqrt(hidden)``
    (`qnpu.qcore.random_hadamard`; ``hidden`` must be a Hadamard order).
    ``"orthogonal"``: ``Q`` of the QR decomposition of a ``seed``-ed standard Gaussian matrix,
    columns' signs fixed so that ``diag(R) > 0``. Computed on the CPU, then moved to ``device``.
    """
    _check_kind(kind)
    if kind == "hadamard" and not is_hadamard_order(hidden):
        raise ValueError(f"{NAME}: hidden={hidden} is not a supported Hadamard order; "
                         "use kind='orthogonal'")
    return _rotation64(int(hidden), int(seed), kind, torch.device(device)).to(dtype, copy=True)


def _rotate_stats(st: LinearStats, right: Callable[[torch.Tensor], torch.Tensor]) -> LinearStats:
    """Stats of ``X' = right(X) = X R``: ``H' = R^T H R = right(right(H^T)^T)``, tokens by rows."""

    def rows(t):
        return None if t is None else right(t.double()).to(t.dtype)

    def both(t):
        return None if t is None else right(right(t.double().T).T).to(t.dtype)

    tokens = rows(st.tokens)
    absmax = None if tokens is None else tokens.abs().amax(0)
    return LinearStats(hessian=both(st.hessian), absmax=absmax, tokens=tokens,
                       fp_tokens=rows(st.fp_tokens), fp_cross=both(st.fp_cross))


def _same_stats(a: LinearStats, b: LinearStats) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                             and x.dtype == y.dtype and torch.equal(x, y))
               for x, y in zip(a, b))


def _head_hadamard(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``x [..., heads * head_dim] -> x kron(I, H_h^T)``: every head's slice times ``H_h^T``."""
    return hadamard_transform(x.unflatten(-1, (heads, head_dim))).flatten(-2)


def _validate(view: BlockView, kind: str, online: bool, per_head: bool) -> None:
    s = view.structure
    missing = [n for n in s.linears if n not in view.targets]
    if missing:
        fail(NAME, view, missing[0], "the residual rotation must reach every linear of the block, but "
             "this one is not a target", f"apply {NAME}() outside masked()/partition()")
    if kind == "hadamard" and not is_hadamard_order(s.hidden_size):
        fail(NAME, view, s.q, f"hidden_size={s.hidden_size} is not a supported Hadamard order",
             "use kind='orthogonal'")
    if per_head and not is_hadamard_order(s.head_dim):
        fail(NAME, view, s.v, f"head_dim={s.head_dim} is not a supported Hadamard order",
             "use per_head=False")
    if online and not is_hadamard_order(s.intermediate_size):
        fail(NAME, view, s.down, f"intermediate_size={s.intermediate_size} is not a supported Hadamard "
             "order, so its input cannot be rotated online", "use online=False (offline rotations only)")


def rotate_block(view: BlockView, seed: int, kind: str, online: bool, per_head: bool) -> BlockView:
    """The rotated view (module docstring); computed in float64, cast back to each tensor's dtype."""
    s = view.structure
    q = _rotation64(s.hidden_size, seed, kind, view.weight(s.q).device)
    new: dict[str, torch.Tensor] = {}  # float64 until the end, so each tensor is rounded once
    stats: dict[str, LinearStats] = {}
    norms = {}
    for norm, readers in s.norm_pairs:
        g = view.params.get(f"{norm}.weight")
        g64 = torch.ones(s.hidden_size, dtype=torch.float64, device=q.device) if g is None else g.double()
        if g is not None:
            norms[f"{norm}.weight"] = torch.ones_like(g)
        done: list[tuple[LinearStats, LinearStats]] = []
        for r in readers:
            new[f"{r}.weight"] = (view.weight(r).double() * g64) @ q
            if r not in view.stats:
                continue
            if bool((g64 == 0).any()):
                raise TransformError(
                    f"{NAME}: layer {view.label(r)}: {norm}.weight has zero entries, so its input "
                    "statistics cannot be mapped to the folded, rotated basis. Fix: recompute the "
                    "statistics on the rotated block")
            # Readers of one norm usually hold equal stats; rotate them once ([hidden]^3 each).
            old = view.stats[r]
            stats[r] = next((rot for src, rot in done if _same_stats(src, old)), None)
            if stats[r] is None:
                stats[r] = _rotate_stats(old, lambda x, g=g64: (x / g) @ q)
                done.append((old, stats[r]))

    w_o = view.weight(s.o).double()
    if per_head:
        heads = lambda x: _head_hadamard(x, s.num_heads, s.head_dim)  # noqa: E731
        kv_heads = lambda x: _head_hadamard(x, s.num_kv_heads, s.head_dim)  # noqa: E731
        w_o = heads(w_o)
        # H_h W_v per kv head == (W_v^T kron(I, H_h^T))^T
        new[f"{s.v}.weight"] = kv_heads(new[f"{s.v}.weight"].T).T
        if view.bias(s.v) is not None:
            new[f"{s.v}.bias"] = kv_heads(view.bias(s.v).double())
        if s.o in view.stats:
            stats[s.o] = _rotate_stats(view.stats[s.o], heads)
    new[f"{s.o}.weight"] = q.T @ w_o
    new[f"{s.down}.weight"] = q.T @ view.weight(s.down).double()
    if online:
        # W H^T, undone by the runtime's x -> x H^T in front of down_proj
        new[f"{s.down}.weight"] = hadamard_transform(new[f"{s.down}.weight"])
        if s.down in view.stats:
            stats[s.down] = _rotate_stats(view.stats[s.down], hadamard_transform)
    for w in s.residual_writers:
        if view.bias(w) is not None:
            new[f"{w}.bias"] = view.bias(w).double() @ q  # Q^T b, as a row vector
    params = {k: v.to(view.params[k].dtype) for k, v in new.items()}
    params.update(norms)
    inputs = view.inputs
    if inputs is not None:
        inputs = (inputs.double() @ q).to(inputs.dtype)
    return view.with_params(params).with_stats(stats)._replace(inputs=inputs)


@register_transform(NAME, reads=())  # it rotates the stats it gets, reads none
def hadamard_rotation(seed: int = 0, kind: str = "hadamard", online: bool = True,
                      per_head: bool = True) -> QTransform:
    """QuaRot's rotations of one block (module docstring has the math).

    seed:     the residual rotation depends on ``(seed, kind)`` only, never on the block, so all
              blocks (and `rotate_edges`) agree.
    kind:     ``"hadamard"`` (random Hadamard, `qnpu.qcore.random_hadamard`) | ``"orthogonal"``
              (random orthogonal from a seeded Gaussian's QR).
    online:   fold a Hadamard into down_proj and record it in ``state.online`` for the runtime;
              False: offline rotations only (for runtimes without online rotations, e.g. vllm-ascend).
    per_head: fold the head_dim Hadamard into V and O.

    Must see every linear of the block as a target (don't wrap it in masked()/partition()).
    Put it before scale searches, smoothing (``pairs='norms'``; up -> down smoothing is not exact
    behind the online Hadamard) and rounders: they then work in the rotated basis.
    """
    check_int(NAME, "seed", seed, 0)
    _check_kind(kind)
    check_flags(NAME, online=online, per_head=per_head)

    def init(view: BlockView) -> RotationState:
        return RotationState(seed, kind, (view.structure.down,) if online else (), per_head)

    def update(view: BlockView, state: RotationState):
        if not view.targets:
            return view, state
        _validate(view, kind, online, per_head)
        new = rotate_block(view, seed, kind, online, per_head)
        names = (view.structure.down,) if online else ()
        if names:
            # Later steps that run the block (searches) or scale channels (smoothing) must know.
            new = new._replace(online_hadamard=tuple(dict.fromkeys(new.online_hadamard + names)))
        return new, RotationState(seed, kind, names, per_head)

    return QTransform(init, update)


def rotate_edges(embed: torch.Tensor, lm_head: torch.Tensor | None = None,
                 final_norm_weight: torch.Tensor | None = None, *, seed: int = 0,
                 kind: str = "hadamard") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rotate the model's edges to match blocks rotated with the same ``(seed, kind)``.

    embed ``E [vocab, hidden]`` -> ``E Q`` (the residual stream starts rotated);
    lm_head ``W [vocab, hidden]`` (None: tied to the *given* ``embed``) -> ``W diag(g) Q`` with the
    final RMSNorm weight ``g`` folded in, and ``g`` -> ones (None stays None, ``g = 1``). Then
    ``rms_norm(x Q, g') (W')^T == rms_norm(x, g) W^T``: the logits are unchanged.

    Returns new tensors ``(embed', lm_head', final_norm')`` in the inputs' dtypes; the inputs are
    not modified. Tied embeddings become untied: ``lm_head'`` differs from ``embed'`` and must be
    saved as its own tensor.
    """
    if embed.dim() != 2:
        raise ValueError(f"rotate_edges: embed must be [vocab, hidden]; got shape {tuple(embed.shape)}")
    hidden = embed.shape[1]
    head = embed if lm_head is None else lm_head
    if head.shape[-1] != hidden or (final_norm_weight is not None and final_norm_weight.shape != (hidden,)):
        raise ValueError(f"rotate_edges: lm_head {tuple(head.shape)} / final_norm_weight "
                         f"{None if final_norm_weight is None else tuple(final_norm_weight.shape)} "
                         f"do not match hidden={hidden}")
    q = rotation_matrix(hidden, seed, kind, device=embed.device)
    g = torch.ones(hidden, dtype=torch.float64, device=embed.device) if final_norm_weight is None \
        else final_norm_weight.double()
    new_embed = (embed.double() @ q).to(embed.dtype)
    new_head = ((head.double() * g) @ q).to(head.dtype)
    new_norm = None if final_norm_weight is None else torch.ones_like(final_norm_weight)
    return new_embed, new_head, new_norm

