"""Render Triton kernels from templates and load them through the on-disk cache.

A kernel is produced in three steps:
  1. the op builds index expressions with sympy (``row_offset``) and prints them as Triton
     code (``texpr``), and fills a template family's fragments (``fill``);
  2. ``render`` substitutes those into the family's ``KERNEL`` template and prepends a header
     naming the kernel, the pass and the FX nodes it came from (STYLE.md rule 9);
  3. ``load_kernel`` hands the source to ``optc.codegen.cache``, which writes it to a real file
     (``@triton.jit`` needs ``inspect.getsource``) and imports it once per process.

Output is deterministic: the same inputs render byte-identical source, so the source text is
both the cache key and something tests assert on.
"""

from __future__ import annotations

import importlib
import string
from dataclasses import dataclass
from typing import Any, Mapping

import sympy
from sympy.printing.str import StrPrinter

from optc.codegen import cache


@dataclass(frozen=True)
class KernelOrigin:
    """Where a kernel came from; rendered as the header comment of its source."""

    kernel: str                    # the op / kernel family, e.g. "add_rms_norm"
    pass_name: str                 # the pass that created it, e.g. "fuse_add_norm"
    nodes: tuple[str, ...] = ()    # FX node names it replaces, in graph order

    def __post_init__(self) -> None:
        for text in (self.kernel, self.pass_name, *self.nodes):
            if not text or "\n" in text or "\r" in text:
                raise ValueError(f"bad kernel origin field {text!r}: one non-empty line each")

    def header(self) -> str:
        nodes = ", ".join(self.nodes) if self.nodes else "(none)"
        return f"# optc kernel {self.kernel}\n# pass: {self.pass_name}\n# nodes: {nodes}"


# ---- index expressions ---------------------------------------------------------------------

class _TritonPrinter(StrPrinter):
    """sympy → Triton expression text; floor division as ``//``, modulo as ``%``.

    Triton's ``//`` and ``%`` truncate toward zero like C, not like Python: index expressions
    are non-negative, where the two agree.
    """

    def _print_floor(self, expr: sympy.Expr) -> str:
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return f"({self._print(num)} // {self._print(den)})"

    def _print_Mod(self, expr: sympy.Mod) -> str:
        a, b = expr.args
        return f"({self._print(a)} % {self._print(b)})"


def _integer_arith(e: sympy.Basic) -> bool:
    """Whether ``e`` is integer arithmetic on integer symbols (division only inside floor)."""
    if isinstance(e, (sympy.floor, sympy.Mod)):
        return True
    if isinstance(e, sympy.Pow):
        return bool(e.exp.is_Integer and e.exp >= 0) and _integer_arith(e.base)
    if e.is_Number:
        return bool(e.is_Integer)
    if e.is_Symbol:
        return bool(e.is_integer)
    return all(_integer_arith(a) for a in e.args)


def texpr(expr: sympy.Expr | int) -> str:
    """Print an integer index expression (built from ``sym`` symbols) as Triton code."""
    expr = sympy.sympify(expr)
    if not _integer_arith(expr):
        raise ValueError(f"non-integer index expression {expr}: use sympy.floor(a / b)")
    return _TritonPrinter().doprint(expr)


def sym(name: str) -> sympy.Symbol:
    """An integer index symbol (program id, lane index, stride, size)."""
    return sympy.Symbol(name, integer=True)


def row_offset(row: sympy.Expr, row_stride: sympy.Expr | int,
               col: sympy.Expr, col_stride: sympy.Expr | int = 1) -> sympy.Expr:
    """Element offset of ``(row, col)``; strides known at codegen time fold away."""
    return sympy.expand(row * row_stride + col * col_stride)


# ---- templates -----------------------------------------------------------------------------

def fill(fragment: str, **holes: object) -> str:
    """Fill a template fragment's ``${hole}``s; every hole must be given and no extra ones."""
    t = string.Template(fragment)
    wanted = set(t.get_identifiers())
    if wanted != set(holes):
        raise KeyError(f"template holes {sorted(wanted)} but got {sorted(holes)}")
    return t.substitute({k: str(v) for k, v in holes.items()})


def template(template_name: str) -> str:
    """The ``KERNEL`` template of family ``optc.codegen.templates.<template_name>``."""
    module = importlib.import_module(f"optc.codegen.templates.{template_name}")
    return module.KERNEL


def render(template_name: str, *, params: Mapping[str, object], origin: KernelOrigin) -> str:
    """Render a whole kernel module: ``params`` fill every hole except ``header``."""
    if "header" in params:
        raise KeyError("'header' is rendered from the origin")
    return fill(template(template_name), header=origin.header(), **params)


def arg_list(names: list[str] | tuple[str, ...]) -> str:
    """One argument group, e.g. ``x_ptr, w_ptr, y_ptr``."""
    return ", ".join(names)


def load_kernel(source: str, entry: str, config: Mapping[str, Any] | None = None) -> Any:
    """The ``@triton.jit`` function ``entry`` of ``source``, built or found in the kernel cache.

    ``config`` (JSON-serializable) is part of the cache key: launch settings that change the
    compiled artifact without changing the text. The interpreter-or-not decision is taken
    when the module is first imported in this process (``TRITON_INTERPRET``).
    """
    return cache.load(source, entry, config)
