"""strength_reduce: golden Before/After graphs per rule, must-not-fire cases per guard, outputs
bit-identical to eager (every replacement is a view of the same elements), exact statistics on
the zoo and HF models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from expecttest import assert_expected_inline

import optc
from optc.capture import capture_export
from optc.graph.printer import format_graph
from optc.graph.verifier import verify
from optc.passes import strength_reduce
from optc.passes.strength_reduce import StrengthReduceConfig

D, H, T = 8, 2, 5


class Positions(nn.Module):
    """GPT-2's learned positions: ``wpe(arange(T))`` (optionally HF's ``unsqueeze(0)``)."""

    def __init__(self, start: int = 0, step: int = 1, unsqueeze: bool = False,
                 rows: int = 16) -> None:
        super().__init__()
        self.wpe = nn.Embedding(rows, D)
        self.start, self.step, self.unsqueeze = start, step, unsqueeze

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(self.start, self.start + tok.shape[1] * self.step, self.step)
        if self.unsqueeze:
            pos = pos.unsqueeze(0)
        return tok + self.wpe(pos) * 2


class ReturnsGather(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wpe = nn.Embedding(16, D)

    def forward(self, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.wpe(torch.arange(tok.shape[1]))
        return tok + p, p                       # p escapes: it must stay a fresh tensor


class MutatesGather(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wpe = nn.Embedding(16, D)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        p = self.wpe(torch.arange(tok.shape[1]))
        p.mul_(2)                               # in place: would write the table if a view
        return tok + p


class TokenTypes(nn.Module):
    """BERT's default token types: every token gathers row 0 of the table."""

    def __init__(self, view_after: bool = False) -> None:
        super().__init__()
        self.tt = nn.Embedding(2, D)
        self.view_after = view_after

    def forward(self, ids: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        t = self.tt(torch.zeros_like(ids))
        if self.view_after:                      # a view of a stride-0 tensor: not rewritten
            return tok + t.view(-1, D).sum()
        return tok + t


class Heads(nn.Module):
    """nanoGPT / HF GPT-2: ``c_attn(x).split(D, dim)`` then view + transpose per head tensor."""

    def __init__(self, dim: int = 2, perm: tuple[int, ...] = (0, 2, 1, 3), sizes: object = D
                 ) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.dim, self.perm, self.sizes = dim, perm, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=self.dim)
        q, k, v = (z.view(B, t, H, -1).permute(*self.perm) for z in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _tok() -> torch.Tensor:
    return torch.randn(1, T, D)


def run_pass(model: nn.Module, args: tuple) -> tuple[str, str, dict[str, int]]:
    gm = capture_export(model, args).gm
    before = format_graph(gm)
    res = strength_reduce.run(gm, StrengthReduceConfig())
    assert res.modified == bool(res.stats)
    verify(res.gm, allow_unknown_ops=False)
    return before, format_graph(res.gm), dict(res.stats)


def _bit_identical(model: nn.Module, args: tuple) -> optc.CompiledModel:
    compiled = optc.compile(model, config={"frontend": "export"})
    with torch.no_grad():
        out, ref = compiled(*args), model(*args)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(o, r)
    return compiled


def test_embedding_arange_golden():
    model = Positions()
    before, after, stats = run_pass(model, (_tok(),))
    assert "aten.embedding($wpe.weight, %arange0)" in before
    assert_expected_inline(after, """\
graph(%in0: f32[1,5,8]):
  %slice0 = aten.slice($wpe.weight, 0, 0, 5) : f32[5,8]
  %mul0 = aten.mul(%slice0, 2) : f32[5,8]
  %add0 = aten.add(%in0, %mul0) : f32[1,5,8]
  return (%add0,)""")
    assert stats == {"embedding_arange": 1}
    _bit_identical(model, (_tok(),))


def test_embedding_arange_through_unsqueeze_golden():
    model = Positions(start=3, unsqueeze=True)
    _, after, stats = run_pass(model, (_tok(),))
    assert_expected_inline(after, """\
graph(%in0: f32[1,5,8]):
  %slice0 = aten.slice($wpe.weight, 0, 3, 8) : f32[5,8]
  %unsqueeze0 = aten.unsqueeze(%slice0, 0) : f32[1,5,8]
  %mul0 = aten.mul(%unsqueeze0, 2) : f32[1,5,8]
  %add0 = aten.add(%in0, %mul0) : f32[1,5,8]
  return (%add0,)""")
    assert stats == {"embedding_arange": 1}
    _bit_identical(model, (_tok(),))


def test_embedding_zeros_golden():
    model = TokenTypes()
    args = (torch.zeros(1, T, dtype=torch.long), _tok())
    _, after, stats = run_pass(model, args)
    assert_expected_inline(after, """\
graph(%in0: i64[1,5], %in1: f32[1,5,8]):
  %select0 = aten.select($tt.weight, 0, 0) : f32[8]
  %expand0 = aten.expand(%select0, [1, 5, 8]) : f32[1,5,8]
  %add0 = aten.add(%in1, %expand0) : f32[1,5,8]
  return (%add0,)""")
    assert stats == {"embedding_zeros": 1}
    _bit_identical(model, args)


def test_embedding_zeros_must_not_fire_under_a_view():
    model = TokenTypes(view_after=True)
    args = (torch.zeros(1, T, dtype=torch.long), _tok())
    before, after, stats = run_pass(model, args)
    assert stats == {} and after == before
    _bit_identical(model, args)


@pytest.mark.parametrize("case", ["step2", "past_the_table", "escapes", "mutated"])
def test_embedding_arange_must_not_fire(case: str):
    model = {"step2": Positions(step=2), "past_the_table": Positions(start=14),
             "escapes": ReturnsGather(), "mutated": MutatesGather()}[case]
    before, after, stats = run_pass(model, (_tok(),))
    assert stats == {} and after == before
    if case != "past_the_table":        # eager raises there (index out of range), so does optc
        _bit_identical(model, (_tok(),))


def test_split_heads_golden():
    model = Heads()
    _, after, stats = run_pass(model, (_tok(),))
    assert_expected_inline(after, """\
graph(%in0: f32[1,5,8]):
  %linear0 = aten.linear(%in0, $c_attn.weight, $c_attn.bias) : f32[1,5,24]
  %view0 = aten.view(%linear0, [1, 5, 3, 2, -1]) : f32[1,5,3,2,4]
  %permute0 = aten.permute(%view0, [2, 0, 3, 1, 4]) : f32[3,1,2,5,4]
  %unbind0 = aten.unbind(%permute0, 0) : (f32[1,2,5,4], f32[1,2,5,4], f32[1,2,5,4])
  %getitem0 = getitem(%unbind0, 0) : f32[1,2,5,4]
  %getitem1 = getitem(%unbind0, 1) : f32[1,2,5,4]
  %getitem2 = getitem(%unbind0, 2) : f32[1,2,5,4]
  %scaled_dot_product_attention0 = aten.scaled_dot_product_attention(%getitem0, %getitem1, %getitem2, None, 0.0, True) : f32[1,2,5,4]
  return (%scaled_dot_product_attention0,)""")
    assert stats == {"split_heads": 1}
    _bit_identical(model, (_tok(),))


@pytest.mark.parametrize("case", ["not_last_dim", "unequal", "other_permute"])
def test_split_heads_must_not_fire(case: str):
    model = {"not_last_dim": Heads(dim=1, sizes=1), "unequal": Heads(sizes=[8, 8, 8]),
             "other_permute": Heads(perm=(0, 2, 3, 1))}[case]
    x = torch.randn(1, 3, D) if case == "not_last_dim" else _tok()
    if case == "not_last_dim":
        model.forward = lambda x: torch.stack(model.c_attn(x).split(1, dim=1)).sum(0)  # type: ignore
    before, after, stats = run_pass(model, (x,))
    assert stats == {} and after == before


@pytest.mark.parametrize("name,expected", [
    ("gpt2-tiny", {"embedding_arange": 1, "split_heads": 2}),
    ("bert-tiny", {"embedding_arange": 1, "embedding_zeros": 1, "split_heads": 2}),
    ("opt-tiny", {"split_heads": 2}), ("llama-tiny", {})])
def test_zoo_statistics(name: str, expected: dict, stats_on):
    assert stats_on(f"zoo:{name}", "strength_reduce") == expected


@pytest.mark.parametrize("arch,expected", [
    ("gpt2", {"embedding_arange": 1, "split_heads": 2}), ("bert", {"split_heads": 2}),
    ("opt", {}), ("llama", {})])
def test_hf_statistics(arch: str, expected: dict, stats_on):
    assert stats_on(f"hf:{arch}", "strength_reduce") == expected
