"""remove_noops: a golden Before/After graph per rule, a must-not-fire case per guard, outputs
bit-identical to eager (the pass's contract: it only deletes ops that return their input's
values), and exact statistics on real models."""

from __future__ import annotations

from collections import Counter
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import assert_expected_inline

import models
import optc
from models.hf import build_hf, hf_example_inputs
from optc.capture import capture_export, capture_symbolic_trace
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import remove_noops

CFG = remove_noops.RemoveNoopsConfig()


class Fn(nn.Module):
    """A module around a function, so each case is one line."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _x() -> torch.Tensor:
    return torch.randn(2, 3)


def run_pass(model: nn.Module, *args: torch.Tensor) -> tuple[str, str, dict[str, int]]:
    """(graph before, graph after, statistics) of remove_noops alone on the captured graph."""
    gm = capture_symbolic_trace(model, args).gm
    before = format_graph(gm)
    res = remove_noops.run(gm, CFG)
    assert res.modified == bool(res.stats)
    res.gm.graph.eliminate_dead_code()
    verify(res.gm)
    return before, format_graph(res.gm), dict(res.stats)


def compiled_equals_eager(model: nn.Module, *args: torch.Tensor) -> None:
    """Bit-identical: the pass only removes ops whose output equals their input exactly."""
    compiled = optc.compile(model, config=optc.CompileConfig(pipeline=("remove_noops",)))
    with torch.no_grad():
        out, ref = compiled(*[a.clone() for a in args]), model(*[a.clone() for a in args])
    assert out.dtype == ref.dtype and torch.equal(out, ref)


# ---------------------------------------------------------------- golden graphs, one per rule


def test_dropout_eval_golden():
    model = nn.Sequential(nn.Dropout(0.1), nn.Tanh()).eval()
    before, after, stats = run_pass(model, _x())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3]):
  %dropout0 = aten.dropout(%in0, 0.1, False) : f32[2,3]
  %tanh0 = aten.tanh(%dropout0) : f32[2,3]
  return [%tanh0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  return [%tanh0]""")
    assert stats == {"dropout_eval": 1}
    compiled_equals_eager(model, _x())


def test_dropout_p0_in_training_golden():
    model = nn.Sequential(nn.Dropout(0.0), nn.Tanh()).train()
    before, after, stats = run_pass(model, _x())
    assert "aten.dropout(%in0, 0.0, True)" in before
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  return [%tanh0]""")
    assert stats == {"dropout_eval": 1}


def test_identity_view_golden():
    model = Fn(lambda x: torch.ops.aten.alias(x.view(2, 3).expand(2, 3)).tanh())
    before, after, stats = run_pass(model, _x())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3]):
  %view0 = aten.view(%in0, [2, 3]) : f32[2,3]
  %expand0 = aten.expand(%view0, [2, 3]) : f32[2,3]
  %alias0 = aten.alias(%expand0) : f32[2,3]
  %tanh0 = aten.tanh(%alias0) : f32[2,3]
  return [%tanh0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  return [%tanh0]""")
    assert stats == {"identity_view": 3}
    compiled_equals_eager(model, _x())


def test_to_same_dtype_golden():
    # HF LlamaRMSNorm's hidden_states.to(torch.float32) on an fp32 model
    model = Fn(lambda x: x.to(torch.float32).tanh() + x.float())
    before, after, stats = run_pass(model, _x())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3]):
  %to0 = aten.to.dtype(%in0, f32) : f32[2,3]
  %tanh0 = aten.tanh(%to0) : f32[2,3]
  %to1 = aten.to.dtype(%to0, f32) : f32[2,3]
  %add0 = aten.add(%tanh0, %to1) : f32[2,3]
  return [%add0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  %add0 = aten.add(%tanh0, %in0) : f32[2,3]
  return [%add0]""")
    assert stats == {"to_same_dtype": 2}
    compiled_equals_eager(model, _x())


def test_contiguous_golden():
    model = Fn(lambda x: x.clone(memory_format=torch.contiguous_format).tanh())
    before, after, stats = run_pass(model, _x())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3]):
  %clone0 = aten.clone(%in0, memory_format=torch.contiguous_format) : f32[2,3]
  %tanh0 = aten.tanh(%clone0) : f32[2,3]
  return [%tanh0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  return [%tanh0]""")
    assert stats == {"contiguous": 1}
    compiled_equals_eager(model, _x())


def test_arith_identity_golden():
    # Llama rotary's ``cos * attention_scaling`` with attention_scaling = 1.0, and friends
    model = Fn(lambda x: (((x * 1.0) / 1) - 0.0).tanh())
    before, after, stats = run_pass(model, _x())
    assert_expected_inline(before, """\
graph(%in0: f32[2,3]):
  %mul0 = aten.mul(%in0, 1.0) : f32[2,3]
  %div0 = aten.div(%mul0, 1) : f32[2,3]
  %sub0 = aten.sub(%div0, 0.0) : f32[2,3]
  %tanh0 = aten.tanh(%sub0) : f32[2,3]
  return [%tanh0]""")
    assert_expected_inline(after, """\
graph(%in0: f32[2,3]):
  %tanh0 = aten.tanh(%in0) : f32[2,3]
  return [%tanh0]""")
    assert stats == {"arith_identity": 3}
    compiled_equals_eager(model, _x())


def test_integer_add_zero_is_removed():
    # HF GPT-2's ``arange(T) + past_length`` with no cache
    model = Fn(lambda x: (x + 0) * 3)
    _, after, stats = run_pass(model, torch.arange(6))
    assert stats == {"arith_identity": 1}
    assert_expected_inline(after, """\
graph(%in0: i64[6]):
  %mul0 = aten.mul(%in0, 3) : i64[6]
  return [%mul0]""")


# ---------------------------------------------------------------- must not fire


@pytest.mark.parametrize("case, fn, train", [
    # dropout_eval: in training with p > 0 dropout is random, not the identity
    ("dropout_train", lambda x: F.dropout(x, 0.1, training=True).tanh(), True),
    # arith_identity / contiguous: the result escapes as a graph output (no new aliasing of an
    # input may become visible to the caller)
    ("mul1_is_output", lambda x: x * 1.0, False),
    ("clone_is_output", lambda x: x.clone(memory_format=torch.contiguous_format), False),
    # to_same_dtype: another dtype is a real cast
    ("to_float64", lambda x: x.to(torch.float64).tanh(), False),
    # arith_identity: not the unit of the op
    ("mul2", lambda x: (x * 2.0).tanh(), False),
    ("add1", lambda x: (x + 1).tanh(), False),
    ("div0_5", lambda x: (x / 0.5).tanh(), False),
    # identity_view: a real reshape or broadcast
    ("view_other_shape", lambda x: x.view(3, 2).tanh(), False),
    ("expand_broadcasts", lambda x: x[:1].expand(2, 3).tanh(), False),
    # contiguous: a plain clone is an explicit copy; a transposed input really moves
    ("clone_plain", lambda x: x.clone().tanh(), False),
    ("contiguous_of_transpose", lambda x: x.t().contiguous().tanh(), False),
    # contiguous / arith_identity: the result is mutated in place afterwards
    ("clone_then_mutated", lambda x: x.clone(memory_format=torch.contiguous_format).add_(1) * x, False),
    ("mul1_then_mutated", lambda x: (x * 1.0).add_(1) * x, False),
])
def test_must_not_fire(case: str, fn: Callable, train: bool):
    model = Fn(fn).train(train)
    before, after, stats = run_pass(model, _x())
    assert stats == {}, case
    assert after == before, case


def test_integer_times_float_one_is_a_cast():
    """must not fire: ``int_tensor * 1.0`` changes the dtype."""
    before, after, stats = run_pass(Fn(lambda x: (x * 1.0).tanh()), torch.arange(6))
    assert stats == {} and after == before
    assert "aten.mul(%in0, 1.0) : f32[6]" in before


def test_to_copy_then_mutated_in_place_keeps_the_copy():
    """must not fire: ``_to_copy`` feeding an in-place op."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._to_copy(x, dtype=torch.float32)
        y.add_(1)
        return x * y

    before, after, stats = run_pass(Fn(fn), _x())
    assert "aten._to_copy" in before
    assert stats == {} and after == before


def test_must_not_fire_numerics():
    x = _x()
    model = Fn(lambda x: (x.clone(memory_format=torch.contiguous_format).add_(1) * x) + x * 1.0)
    compiled_equals_eager(model, x)


# ---------------------------------------------------------------- regressions (bugs found and fixed)


def test_mutation_through_a_view_blocks_removal():
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0
        y.view(-1).add_(1.0)
        return x + y  # eager: x + (x + 1)

    x = torch.ones(2, 2)
    compiled = optc.compile(Fn(fn), config=optc.CompileConfig(pipeline=("remove_noops",)))
    out = compiled(x)
    assert torch.equal(x, torch.ones(2, 2)), "the caller's input was mutated"
    assert torch.equal(out, torch.full((2, 2), 3.0))


def test_result_escaping_through_a_view_is_not_aliased_to_the_input():
    x = torch.ones(2, 2)
    compiled = optc.compile(Fn(lambda x: (x * 1.0).view(-1)),
                            config=optc.CompileConfig(pipeline=("remove_noops",)))
    out = compiled(x)
    out.add_(1)
    assert torch.equal(x, torch.ones(2, 2))


def test_add_zero_keeps_sign_of_zero():
    x = torch.tensor([-0.0, 1.0])
    compiled = optc.compile(Fn(lambda x: 1.0 / (x + 0.0)), config=optc.CompileConfig(pipeline=("remove_noops",)))
    assert torch.equal(compiled(x), torch.tensor([float("inf"), 1.0]))


def test_to_device_with_copy_true_is_kept():
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.to(x.device, torch.float32, False, True)  # copy=True: a fresh tensor
        y.add_(1.0)
        return x + y

    _, _, stats = run_pass(Fn(fn), _x())
    assert stats == {}


# ---------------------------------------------------------------- statistics on real models


def _stats(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
    gm = capture_export(model, args, kwargs).gm
    return dict(remove_noops.run(gm, CFG).stats)


def test_stats_llama_tiny():
    model = models.build("llama-tiny")
    # 5 RMSNorms (2 per block x 2 blocks + final) each cast to fp32 and back: 10, plus the
    # rope cos/sin tables cast to x.dtype: 2. All fp32 -> fp32.
    assert _stats(model, *models.example_inputs(model, seq=8)) == {"to_same_dtype": 12}


def test_stats_gpt2_tiny():
    model = models.build("gpt2-tiny")
    # nanoGPT without dropout modules and with fp32 LayerNorm: nothing to remove
    assert _stats(model, *models.example_inputs(model, seq=8)) == {}


def test_stats_hf_gpt2():
    model = build_hf("gpt2")
    assert _stats(model, *hf_example_inputs(model, seq=8)) == {
        # embedding dropout + 2 blocks x (attention residual dropout, MLP dropout), all eval
        "dropout_eval": 5,
        # input_ids.view(-1, T), position_ids.expand(B, -1), the causal mask's expand, each
        # block's (B, H, T, D) -> (B, -1, T, D) reshape of the attention output (2), the final
        # hidden state's view to its own shape, and the alias of the logits_to_keep slice
        "identity_view": 7,
        # arange(T) + past_length (0, no cache) in position ids and the two mask index ranges
        "arith_identity": 3,
        # the position embedding cast to the model dtype and 2 bool mask casts to bool
        "to_same_dtype": 3,
    }


def test_pass_is_idempotent():
    model = models.build("llama-tiny")
    gm = capture_export(model, *models.example_inputs(model, seq=8)).gm
    remove_noops.run(gm, CFG)
    again = remove_noops.run(gm, CFG)
    assert not again.modified and again.stats == Counter()
