"""Instruction-set targets: which variants of the C a package holds, and what each needs.

A target is a name such as ``x86-64-v3``, a comma-separated list of them (best
first: the package holds code for each and the loader runs the best the CPU
has), or ``native``; ``+sanitize`` builds any of them with AddressSanitizer.
"""

from __future__ import annotations

import os
import platform
import re

from ..kernel import Variant, best_variant, cpu_features

SOURCE = "kernels.c"
SANITIZE = "sanitize"

# Features each -march level promises, as /proc/cpuinfo names them (abm = lzcnt).
TARGET_FEATURES = {
    "x86-64-v4": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "abm",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "abm"),
    "x86-64-v2": ("sse4_1", "sse4_2", "ssse3", "popcnt", "cx16"),
    "x86-64": (),
    "generic": (),
}
_ISA_FLAG = re.compile(r"^(sse|ssse|avx|fma|bmi|f16c|movbe|abm|popcnt|adx|sha|vaes|vpclmul|gfni|aes"
                       r"|pclmul|amx|lzcnt|asimd|sve|neon|fp|vsx|altivec)")


TARGET_ENV = "SYMCONV_TARGET"


def default_target() -> str:
    """``$SYMCONV_TARGET`` where it is set (a target list such as ``x86-64-v3``: a machine
    that only builds for itself compiles half as much).  Else, where the CPU has x86-64-v3:
    code for both AVX-512 (x86-64-v4) and AVX2 (x86-64-v3) in one package, the loader running
    the best its CPU has, so the package runs on any AVX2 machine and at full width where
    AVX-512 exists.  Elsewhere the architecture's portable baseline."""
    chosen = os.environ.get(TARGET_ENV, "").strip()
    if chosen:
        if "+" in chosen:     # a modifier; and "+sanitize" alone would ask for this default
            raise ValueError(f"${TARGET_ENV}={chosen!r}: a default target cannot be "
                             f"sanitized; pass target='...+sanitize' where it is wanted")
        try:
            split_target(chosen)
        except ValueError as error:
            raise ValueError(f"${TARGET_ENV}: {error}") from None
        return chosen
    if platform.machine() in ("x86_64", "AMD64"):
        have = cpu_features() or set()
        if set(TARGET_FEATURES["x86-64-v3"]) <= have:
            return "x86-64-v4,x86-64-v3"
        return "x86-64"
    return "generic"


def split_target(target: str | None) -> tuple[tuple[str, ...], bool]:
    """(instruction-set targets in order of preference, sanitize) from a target name such as
    ``x86-64-v3``, ``x86-64-v4,x86-64-v3``, ``native+sanitize`` or ``+sanitize`` (the default
    target, sanitized)."""
    if target is not None and not isinstance(target, str):
        raise ValueError(f"target must be a string such as 'x86-64-v3', got {target!r}")
    base, *modifiers = (target or "").split("+")
    unknown = [m for m in modifiers if m != SANITIZE]
    if unknown or len(modifiers) > 1:
        raise ValueError(f"unknown target modifier in {target!r}; the only one is "
                         f"'+{SANITIZE}' (e.g. 'x86-64-v3+{SANITIZE}')")
    names = tuple((base or default_target()).split(","))
    for name in names:
        if name != "native" and name not in TARGET_FEATURES:
            raise ValueError(f"unknown target {name!r}; expected native or one of "
                             f"{', '.join(TARGET_FEATURES)}, or several joined by commas "
                             f"(best first), optionally with '+{SANITIZE}'")
    if len(set(names)) != len(names):
        raise ValueError(f"target {target!r} names an instruction set twice")
    return names, bool(modifiers)


def _features(name: str) -> list[str]:
    """The CPU features code built for one instruction-set target needs."""
    if name == "native":
        return sorted(f for f in cpu_features() or set() if _ISA_FLAG.match(f))
    return list(TARGET_FEATURES[name])


def _isa(features) -> str | None:
    """The vector instructions symconv's code uses given these CPU features: "avx512",
    "avx2" (with FMA), or None for plain C."""
    features = set(features)
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= features:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= features else None


def variants(target: str | None = None) -> list[Variant]:
    """One entry per instruction set a package for ``target`` holds code for, best first:
    its target name, vector ISA, compiler flags, the CPU features it needs, its C file and
    the prefix of its function symbols.  A single-target package keeps the plain names."""
    names, _ = split_target(target)
    found = []
    for name in names:
        features = _features(name)
        single = len(names) == 1
        found.append(Variant(
            target=name,
            isa=_isa(features),
            flags=() if name == "generic" else (f"-march={name}",),
            cpu_features=tuple(features),
            source=SOURCE if single else f"kernels-{name}.c",
            prefix="symconv_" if single else f"symconv_{name.replace('-', '_')}_",
        ))
    return found



def vector_isa(target: str | None = None) -> str | None:
    """The vector instructions of the code this machine runs from a package built for
    ``target`` (default: the default target): "avx512", "avx2" (with FMA), or None."""
    return best_variant(variants(target)).isa


