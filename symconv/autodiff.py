"""The VJP table at run time: what every binding differentiates with.

A package's manifest says, for each of its functions and each differentiable
argument, which compiled function computes that gradient (``Kernel.vjp``): the
forward's gradients are the package's own ``grad_<input>`` functions; a
gradient function is differentiated as an op of its own, the package of
``GradientSpec(op, function)``, derived and built the first time it is needed
(in the same cache, for the same target).  :func:`vjp` turns an entry into a
:class:`Rule` a binding can call.  Forward mode needs nothing more:
:func:`jvp` is the VJP of a VJP with respect to its cotangent (a VJP is linear
in its cotangent, and the transpose of ``v -> J^T v`` is ``t -> J t``).

The graph, ``symconv.torch``, ``symconv.jax`` and ``symconv.dask`` all use
this module; none of them writes a gradient formula by hand.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .spec import GradientSpec, spec_from_dict, spec_of


@dataclass(frozen=True)
class Package:
    """A spec's compiled package, where its caller keeps kernels (``cache_dir``, ``target``;
    None for the defaults).  Hashable; ``handle`` is its JSON text, which framework graphs
    (torch.export, jax.jit) carry as a constant."""

    spec: Any
    cache_dir: str | None = None
    target: str | None = None

    @property
    def kernel(self):
        """The loaded kernel (built on first use; then a dictionary look-up)."""
        from .compiler import KERNELS
        return KERNELS.get(self.spec, self.cache_dir, self.target)

    def gradient(self, function: str) -> "Package":
        """The package of one of this package's gradient functions, as an op of its own."""
        return Package(spec_of(GradientSpec, parent=self.spec, function=function),
                       self.cache_dir, self.target)

    @functools.cached_property
    def handle(self) -> str:
        return json.dumps({"spec": {"kind": self.spec.KIND, **self.spec.to_dict()},
                           "cache_dir": self.cache_dir, "target": self.target},
                          sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def package(handle: str) -> Package:
    """The package a :attr:`Package.handle` names (parsed once per process)."""
    try:
        data = json.loads(handle)
        spec = spec_from_dict(data["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a symconv package handle ({error}): {handle[:200]!r}") from None
    return Package(spec, data.get("cache_dir"), data.get("target"))


def package_of(spec, cache_dir: str | os.PathLike | None = None,
               target: str | None = None) -> Package:
    """A spec's package in ``cache_dir`` for ``target`` (one object per distinct request, so
    its handle is made once)."""
    return _package(spec, None if cache_dir is None else os.path.abspath(cache_dir), target)


@functools.lru_cache(maxsize=1024)
def _package(spec, cache_dir: str | None, target: str | None) -> Package:
    return Package(spec, cache_dir, target)


@dataclass(frozen=True)
class Rule:
    """One gradient as a call: ``function`` of ``package`` on the arrays named ``args`` (names
    of the differentiated function's arguments, and ``cotangent`` for the incoming gradient)."""

    package: Package
    function: str
    args: tuple[str, ...]
    cotangent: str

    def arrays(self, values: Mapping[str, Any], cotangent: Any) -> list:
        """The call's arguments from the differentiated function's (by name) and the cotangent."""
        return [cotangent if name == self.cotangent else values[name] for name in self.args]


def differentiable(package: Package, function: str) -> tuple[str, ...]:
    """The arguments of ``function`` that have a gradient."""
    return tuple(package.kernel.vjp[function])


@functools.lru_cache(maxsize=4096)
def vjp(package: Package, function: str, arg: str) -> Rule:
    """The rule computing ``function``'s gradient with respect to ``arg``."""
    kernel = package.kernel
    entries = kernel.vjp.get(function, {})
    if arg not in entries:
        raise ValueError(f"{function} of {package.spec.describe()} has no gradient with "
                         f"respect to {arg!r} (it has: {', '.join(entries) or 'none'})")
    entry = entries[arg]
    if entry.gradient_of is None:
        return Rule(package, entry.function, entry.args, kernel.record.cotangent)
    owner = package.gradient(entry.gradient_of)
    derived = owner.kernel
    return Rule(owner, entry.function, derived.functions[entry.function].args,
                derived.record.cotangent)


@functools.lru_cache(maxsize=4096)
def jvp(package: Package, function: str, arg: str) -> Rule:
    """The rule computing ``function``'s directional derivative along a tangent of ``arg``:
    the VJP of its VJP with respect to the cotangent.  The rule's ``cotangent`` names the
    tangent; its other arguments are ``function``'s own."""
    first = vjp(package, function, arg)
    second = vjp(first.package, first.function, first.cotangent)
    if first.cotangent in second.args:      # a VJP is linear in its cotangent
        raise RuntimeError(f"the derived gradient of {first.function} reads its cotangent "
                           f"{first.cotangent}; report this to the symconv developers")
    return second

