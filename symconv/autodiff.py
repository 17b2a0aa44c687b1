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
        """The loaded kernel (built on first use), kept here until the process's kernel
        cache is cleared."""
        from .compiler import KERNELS
        held = self.__dict__.get("_held")
        if held is None or held[0] != KERNELS.generation:
            held = (KERNELS.generation, KERNELS.get(self.spec, self.cache_dir, self.target))
            object.__setattr__(self, "_held", held)
        return held[1]

    def gradient(self, function: str, content: str | None = None) -> "Package":
        """The package of one of this package's gradient functions, as an op of its own
        (named by ``content``, its digest, where the manifest gives one)."""
        return _package(spec_of(GradientSpec, parent=self.spec, function=function,
                                content=content), self.cache_dir, self.target)

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
    """One gradient as a call: ``function`` of ``package``, each of whose arguments comes from
    ``sources``: the name of one of the differentiated function's arguments, or None for the
    incoming cotangent (or, in a :func:`jvp` rule, the tangent)."""

    package: Package
    function: str
    sources: tuple[str | None, ...]

    @property
    def params(self) -> tuple[str, ...]:
        """The names ``function`` gives its own arguments."""
        return self.package.kernel.functions[self.function].args

    def arrays(self, values: Mapping[str, Any], cotangent: Any) -> list:
        """The call's arguments from the differentiated function's (by name) and the cotangent."""
        return [cotangent if source is None else values[source] for source in self.sources]


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
        cotangent = kernel.record.cotangent
        return Rule(package, entry.function,
                    tuple(None if a == cotangent else a for a in entry.args))
    # the derived package's forward is this function: their arguments match in the order of
    # its content (both orders from the manifests), else position by position
    args = kernel.functions[function].args
    owner = package.gradient(function, entry.content)
    derived = owner.kernel
    own = derived.functions["forward"].args
    theirs, ours = (derived.record.canonical_order, entry.order) if entry.content else (None, None)
    if theirs is not None and ours is not None:
        own, args = [own[k] for k in theirs], [args[k] for k in ours]
    if len(own) != len(args) or [derived.record.shapes[a] for a in own] != \
            [kernel.record.shapes[a] for a in args]:
        raise RuntimeError(f"the derived package {derived.name} does not take the arguments of "
                           f"{function} of {package.spec.describe()}; report this to the "
                           f"symconv developers")
    by_position = dict(zip(own, args))
    inner = derived.vjp["forward"][own[list(args).index(arg)]]
    return Rule(owner, inner.function, tuple(by_position.get(a) for a in inner.args))


@functools.lru_cache(maxsize=4096)
def jvp(package: Package, function: str, arg: str) -> Rule:
    """The rule computing ``function``'s directional derivative along a tangent of ``arg``:
    the VJP of its VJP with respect to the cotangent (None among its sources is the
    tangent; the others name ``function``'s arguments)."""
    first = vjp(package, function, arg)
    second = vjp(first.package, first.function, first.params[first.sources.index(None)])
    sources = []
    for source in second.sources:
        if source is None:
            sources.append(None)
            continue
        outer = first.sources[first.params.index(source)]
        if outer is None:        # a VJP is linear in its cotangent: its VJP cannot read it
            raise RuntimeError(f"the derived gradient of {first.function} reads its cotangent; "
                               f"report this to the symconv developers")
        sources.append(outer)
    return Rule(second.package, second.function, tuple(sources))
