"""The transform contract "what a transform reads": every registered transform declares it, combinators
take the union of their parts, and the declarations are honest: a transform's params, specs and
state are the same when every statistic it does not declare is taken away from its view."""
from __future__ import annotations

import pytest
import torch

from qnpu.qcore import QSpec
from qnpu.testing import random_block
from qnpu.transforms import base
from qnpu.transforms import (
    READS,
    UNDECLARED_READS,
    EmptyState,
    QTransform,
    activation_scales,
    awq,
    billm,
    chain,
    declares_reads,
    gptaq,
    gptq,
    hadamard_rotation,
    hqq,
    masked,
    minmax_scales,
    mse_scale_search,
    partition,
    percentile_scales,
    quant_specs,
    reads_of,
    recipe_from_dict,
    recipe_to_dict,
    recipes,
    register_transform,
    registered_transforms,
    rtn,
    slim_llm,
    smoothquant,
    state_to_dict,
)
from qnpu.transforms.stats import block_stats

W4 = QSpec(bits=4)
W8 = QSpec(bits=8)
W3G = QSpec(bits=3, granularity="group", group_size=32, axis=-1, symmetric=False, format="uint")
A8D = QSpec(bits=8, granularity="token", dynamic=True)
W3GF = W3G.replace(zero_point_domain="float")
A8S = QSpec(bits=8, granularity="tensor")


def undeclared() -> QTransform:
    return QTransform(lambda view: EmptyState(), lambda view, state: (view, state))


def test_leaf_declarations():
    assert reads_of(rtn()) == reads_of(hadamard_rotation()) == reads_of(minmax_scales()) == frozenset()
    assert reads_of(percentile_scales()) == reads_of(mse_scale_search()) == frozenset()
    assert reads_of(mse_scale_search(weighted=True)) == {"hessian"}
    assert reads_of(gptq()) == reads_of(billm()) == reads_of(slim_llm()) == {"hessian"}
    assert reads_of(gptaq()) == {"hessian", "float_path"}
    assert reads_of(awq(score="layers")) == reads_of(activation_scales()) == reads_of(smoothquant()) == \
        {"activations"}
    assert reads_of(awq(score="module")) == {"activations", "block_inputs"}  # q/k/v scored by the attention output
    assert reads_of(smoothquant(search=True)) == {"activations", "block_inputs"}
    # a static activation spec's scales come from calibration (activation_scales or the engine)
    assert reads_of(quant_specs(weight=W8, activation=A8S)) == {"activations"}
    assert reads_of(quant_specs(weight=W8, activation=A8D)) == reads_of(quant_specs(weight=W8)) == frozenset()
    assert reads_of(undeclared()) == UNDECLARED_READS and "float_path" not in UNDECLARED_READS


def test_combinators_take_the_union_of_their_parts():
    assert reads_of(chain()) == frozenset()
    assert reads_of(chain(quant_specs(weight=W4, activation=A8D), hadamard_rotation(), rtn())) == frozenset()
    assert reads_of(chain(quant_specs(weight=W4), awq(score="layers"), gptq())) == {"activations", "hessian"}
    assert reads_of(masked("*.down_proj", gptaq())) == {"hessian", "float_path"}
    assert reads_of(masked("*.down_proj", rtn())) == frozenset()
    assert reads_of(partition({"*.q_proj": gptq(), "*.k_proj": rtn()})) == {"hessian"}
    assert reads_of(partition({"*.q_proj": rtn()}, default=smoothquant(search=True))) == \
        {"activations", "block_inputs"}
    assert reads_of(partition({"*.q_proj": rtn()})) == frozenset()  # no default: nothing else runs
    nested = chain(quant_specs(weight=W4), masked("*.mlp.*", partition({"*.up_proj": gptaq()},
                                                                        default=awq(score="layers"))), rtn())
    assert reads_of(nested) == {"hessian", "float_path", "activations"}


def test_a_transform_that_declares_nothing_is_flagged_and_may_read_anything(monkeypatch):
    monkeypatch.setattr(base, "_FACTORIES", dict(base._FACTORIES))  # registered for this test only
    monkeypatch.setattr(base, "_READ_DECLARATIONS", dict(base._READ_DECLARATIONS))

    @register_transform("test_reads_forgetful")
    def forgetful() -> QTransform:
        return undeclared()

    assert [n for n in registered_transforms() if not declares_reads(n)] == ["test_reads_forgetful"]
    assert forgetful().reads is None and reads_of(forgetful()) == UNDECLARED_READS
    assert reads_of(chain(rtn(), forgetful())) == UNDECLARED_READS  # a part that says nothing may read anything
    assert reads_of(masked("*", chain(forgetful()))) == UNDECLARED_READS


def test_declarations_survive_the_plain_dict_round_trip():
    for name in recipes.names():
        recipe = recipes.get(name)
        assert recipe.reads is not None
        assert recipe_from_dict(recipe_to_dict(recipe)).reads == recipe.reads, name
    assert reads_of(recipes.get("w8a8-dynamic")) == reads_of(recipes.get("w8a16")) == frozenset()
    assert reads_of(recipes.get("w4a16-rtn")) == frozenset()
    assert reads_of(recipes.get("w4a16-gptq")) == {"hessian"} and reads_of(recipes.get("w8a8")) == {"activations"}


def test_unknown_read_names_are_refused():
    with pytest.raises(ValueError, match="unknown"):  # refused before anything is registered
        register_transform("test_reads_bogus", reads={"hessian", "gradients"})
    assert "test_reads_bogus" not in registered_transforms()


# one example per registered transform (some with the arguments that change what they read); each
# is a whole chain with the specs it needs, so it runs on a random block
EXAMPLES = {
    "chain": [chain(quant_specs(weight=W4), rtn())],
    "masked": [chain(quant_specs(weight=W4), masked("*.mlp.*", gptq()))],
    "partition": [chain(quant_specs(weight=W4, activation=A8D),
                        partition({"*.self_attn.*": awq()}, default=smoothquant(search=True)), rtn())],
    "quant_specs": [chain(quant_specs(weight=W8, activation=A8S), rtn()),
                    chain(quant_specs(weight=W8, activation=A8D), rtn())],
    "rtn": [chain(quant_specs(weight=W4), rtn("stochastic", seed=1))],
    "minmax_scales": [chain(quant_specs(weight=W3G), minmax_scales(), rtn())],
    "percentile_scales": [chain(quant_specs(weight=W3G), percentile_scales(), rtn())],
    "mse_scale_search": [chain(quant_specs(weight=W3G), mse_scale_search(), rtn()),
                         chain(quant_specs(weight=W3G), mse_scale_search(weighted=True), rtn())],
    "awq": [chain(quant_specs(weight=W3G), awq(score="module"), rtn()),
            chain(quant_specs(weight=W3G), awq(score="layers", clip_qk=False), rtn())],
    "smoothquant": [chain(quant_specs(weight=W4, activation=A8D), smoothquant(0.8), rtn()),
                    chain(quant_specs(weight=W4, activation=A8D), smoothquant(search=True, pairs="all"), rtn())],
    "activation_scales": [chain(quant_specs(weight=W8, activation=A8S), activation_scales(), rtn())],
    "hadamard_rotation": [chain(quant_specs(weight=W4, activation=A8D), hadamard_rotation(seed=3), rtn()),
                          chain(quant_specs(weight=W4), hadamard_rotation(kind="orthogonal", online=False), rtn())],
    "gptq": [chain(quant_specs(weight=W4), gptq(act_order=True))],
    "hqq": [chain(quant_specs(weight=W3GF), hqq(), rtn())],
    "gptaq": [chain(quant_specs(weight=W4), gptaq())],
    "billm": [chain(quant_specs(weight=QSpec(bits=1, format="binary")), billm(block_size=32))],
    "slim_llm": [chain(quant_specs(weight=W3G), slim_llm(bits=3, group_size=32))],
}


def test_every_registered_transform_declares_what_it_reads():
    assert [n for n in registered_transforms() if not declares_reads(n)] == []
    assert sorted(EXAMPLES) == list(registered_transforms())  # a new transform needs a row below


@pytest.fixture(scope="module")
def view():
    """A random block whose stats include a float path (fp_cross != 0), and its block inputs."""
    v = random_block(0, seq=32)
    g = torch.Generator().manual_seed(1)
    fp_x = v.inputs + 0.05 * v.inputs.abs().mean() * torch.randn(v.inputs.shape, generator=g)
    return v.with_stats(block_stats(v.params, v.structure, v.inputs, fp_x=fp_x))


def strip(view, reads: frozenset):
    """``view`` without what ``reads`` does not name."""
    keep = {"hessian": "hessian" in reads, "absmax": "activations" in reads, "tokens": "activations" in reads,
            "fp_tokens": "float_path" in reads, "fp_cross": "float_path" in reads}
    stats = {n: st._replace(**{f: None for f, k in keep.items() if not k}) for n, st in view.stats.items()}
    return view._replace(stats=stats, inputs=view.inputs if "block_inputs" in reads else None)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name, recipe", [(n, r) for n, rs in EXAMPLES.items() for r in rs],
                         ids=[f"{n}-{i}" for n, rs in EXAMPLES.items() for i in range(len(rs))])
def test_declarations_are_honest(name, recipe, view):
    """Same params, specs and state without the statistics the recipe does not declare: a transform that
    reads more than it declares fails here (or raises for the missing statistic)."""
    reads = reads_of(recipe)
    assert reads <= READS
    full, state = recipe.update(view, recipe.init(view))
    lean_view = strip(view, reads)
    lean, lean_state = recipe.update(lean_view, recipe.init(lean_view))
    assert _same(dict(full.params), dict(lean.params)), f"{name}: params depend on statistics it does not declare"
    assert _same(dict(full.specs), dict(lean.specs)) and full.online_hadamard == lean.online_hadamard
    assert _same(state_to_dict(state), state_to_dict(lean_state)), f"{name}: state depends on undeclared statistics"
