"""Inductor's view-index simplification, extended to sizes that are sums (dynamic shapes).

A view that merges two dimensions, such as ``(B, N, C) -> (B·N, C)`` in front of a linear,
reads its input at ``C·N·(i // N) + C·(i % N)``. Inductor's ``join_dimensions`` turns that
back into ``C·i`` by matching the term ``scale·N·FloorDiv(i, N)`` against
``scale·ModularIndexing(i, 1, N)``. With static shapes ``N`` is a number and the term is one
product. With dynamic shapes the token count below a stride-2 convolution is
``N = (1 + (h - 1)//2)·(1 + (w - 1)//2)``, which sympy keeps expanded
(``1 + a + b + a·b``), so ``C·N·FloorDiv(i, N)`` is four terms, the match fails, and the view
stays a gather: Inductor materialises it with a copy kernel and cannot fuse across it.
On the CPU the dynamic tiny SDXL UNet compiled such an identity copy after the LayerNorm of
its downsampled transformer block, where the static graph has none; the H100 profile of the
full SDXL UNet at 960x720 (``benchmarks/results/2026-11-27_h100_step_dyn960_unet.json``) has
105 launches of a kernel of that name and 2.8 ms more elementwise time per step dynamic than
static.

The extension compares the *coefficient* of the partner (``FloorDiv(i, d·N)``, or the next
``ModularIndexing`` out when three or more dimensions merge) in the expanded index with
``scale·N`` instead of matching one term, and joins the pair when they are equal. It only
looks at pairs whose modulus is a sum, so static graphs (integer moduli) take Inductor's own
rule alone. It is patched in while difforge's compiles run (the module global that
``SizeVarAllocator`` calls) and counted in ``difforge.passes.counters["index_join.symbolic"]``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sympy

from difforge.passes import counters
from difforge.scoped_patch import ScopedPatch, Undo

log = logging.getLogger(__name__)

JOINED = "index_join.symbolic"


def _functions() -> tuple[Any, Any] | None:
    try:
        from torch.utils._sympy.functions import FloorDiv, ModularIndexing
    except ImportError:  # pragma: no cover - every supported torch has both
        return None
    return FloorDiv, ModularIndexing


def join_symbolic(expr: Any) -> Any:
    """Inductor's two view joins, for a modulus ``M`` that is a sum:

    - ``scale·ModularIndexing(b, d, M) + scale·M·ModularIndexing(b, d·M, M2)``
      ``-> scale·ModularIndexing(b, d, M·M2)`` (two merged dimensions), and
    - ``scale·ModularIndexing(b, d, M) + scale·M·FloorDiv(b, d·M) -> scale·FloorDiv(b, d)``
      (the outermost one),

    where the second product appears expanded into several terms. A pair is joined when the
    partner's coefficient in the expanded index equals ``scale·M``; anything else comes back
    unchanged."""
    functions = _functions()
    if functions is None or not isinstance(expr, sympy.Add) or not expr.has(functions[1]):
        return expr  # most indices: nothing to join, no pattern built
    floor_div, modular = functions
    scale = sympy.Wild("scale", exclude=[0], integer=True)
    base = sympy.Wild("base", integer=True)
    divisor = sympy.Wild("divisor", integer=True)
    modulus = sympy.Wild("modulus", integer=True)
    expanded = None  # the whole index expanded, once, when a term is worth a look
    for term in expr.args:
        m = term.match(scale * modular(base, divisor, modulus))
        if not m or not isinstance(m[modulus], sympy.Add):
            continue  # a monomial modulus: Inductor's own rule handles it
        b, d, mod, sc = m[base], m[divisor], m[modulus], m[scale]
        if expanded is None:
            expanded = sympy.expand(expr)
        outer = sympy.expand(d * mod)
        partners = [a for a in expanded.atoms(modular, floor_div) if a.args[0] == b]
        for partner in partners:
            if sympy.expand(partner.args[1] - outer) != 0:
                continue  # not the next dimension out
            coefficient = expanded.coeff(partner)
            if coefficient == 0 or sympy.expand(coefficient - sc * mod) != 0:
                continue
            if isinstance(partner, modular):
                merged_mod = sympy.expand(mod * partner.args[2])
                inner_same = (
                    d == 1
                    and isinstance(b, modular)
                    and b.args[1] == 1
                    and sympy.expand(b.args[2] - merged_mod) == 0
                )
                # (x mod M) mod M is x mod M: the digits of the inner dimension, joined
                merged = sc * (b if inner_same else modular(b, d, merged_mod))
            else:
                merged = sc * floor_div(b, d)
            counters[JOINED] += 1
            joined = expanded - coefficient * partner - sympy.expand(term) + merged
            return join_symbolic(sympy.expand(joined))
    return expr


def _extended(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def join_dimensions(expr: Any) -> Any:
        return join_symbolic(original(expr))

    return join_dimensions


def _install() -> Undo | None:
    try:
        sizevars = importlib.import_module("torch._inductor.sizevars")
    except ImportError:  # pragma: no cover
        return None
    original = getattr(sizevars, "join_dimensions", None)
    if original is None or _functions() is None:
        log.debug("difforge: this torch has no join_dimensions to extend")
        return None
    sizevars.join_dimensions = _extended(original)

    def undo() -> None:
        sizevars.join_dimensions = original

    return undo


joined_symbolic_dimensions = ScopedPatch(_install)
"""While the body runs, Inductor's ``join_dimensions`` also joins symbolic-sum moduli.
Yields whether the patch is in place. Re-entrant and thread-safe (counted, one patch)."""


@functools.cache
def cache_salt() -> bytes:
    """This module's source: the code Inductor generates depends on it, so it is part of
    the FX-graph cache key (difforge.backend)."""
    return hashlib.sha256(Path(__file__).read_bytes()).digest()


__all__ = ["JOINED", "cache_salt", "join_symbolic", "joined_symbolic_dimensions"]
