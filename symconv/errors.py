"""The errors symconv raises beyond ValueError/TypeError, importable without SymPy or a compiler.

``PackageError`` is defined in ``kernel.py`` (which ships alone inside every
package) and re-exported here so that every error has one home to import from.
"""

from .kernel import PackageError


class IRError(ValueError):
    """An index sum that is not well formed; the message names the offending part."""


class BuildError(RuntimeError):
    """The C compiler failed; the message holds the command and its output."""


class GeneratedCodeError(BuildError):
    """The C compiler refused C that symconv generated (raised by the build stage; the driver
    turns it into an InternalError that names the spec)."""


class InternalError(RuntimeError):
    """A bug in symconv, not in the input: the message says where the report files are."""


__all__ = ["BuildError", "GeneratedCodeError", "IRError", "InternalError", "PackageError"]
