"""A crate's licence, said the way the kernel reads it: Cargo's SPDX expression mapped to one of
the strings `MODULE_LICENSE()` knows.

The kernel compares the string literally (include/linux/license.h license_is_gpl_compatible,
6.1.192 and 6.12.117): anything else, `GPL-2.0-only` included, taints the kernel as proprietary
(kernel/module/main.c set_license: "module license '%s' taints kernel.") and keeps the module from
binding EXPORT_SYMBOL_GPL symbols. So an SPDX string is never passed through: it is mapped, or
refused with the list of what is accepted.
"""

from __future__ import annotations

import re

from .errors import RustkoError

# include/linux/module.h (6.1.192, 6.12.117), the comment above MODULE_LICENSE: every ident the
# kernel knows, and whether license_is_gpl_compatible (include/linux/license.h) accepts it.
KERNEL_LICENSES: dict[str, bool] = {
    "GPL": True,                        # [GNU Public License v2]
    "GPL v2": True,                     # [GNU Public License v2]
    "GPL and additional rights": True,  # [GNU Public License v2 rights and more]
    "Dual BSD/GPL": True,               # [GNU Public License v2 or BSD license choice]
    "Dual MIT/GPL": True,               # [GNU Public License v2 or MIT license choice]
    "Dual MPL/GPL": True,               # [GNU Public License v2 or Mozilla license choice]
    "Proprietary": False,               # [Non free products]
}

# SPDX identifiers of the GPL v2. module.h: "GPL v2" and "GPL" both "merely state that the module
# is licensed under the GPL v2, but are not telling whether 'GPL v2 only' or 'GPL v2 or later'",
# so all four map to "GPL", the spelling the Dual strings use.
GPL2: frozenset[str] = frozenset({"GPL-2.0-only", "GPL-2.0-or-later", "GPL-2.0", "GPL-2.0+"})

# SPDX identifiers that, offered beside the GPL v2 (`X OR GPL-2.0-only`), make one of module.h's
# "Dual X/GPL" strings.
DUAL: dict[str, str] = {
    "MIT": "Dual MIT/GPL",
    "BSD-2-Clause": "Dual BSD/GPL",
    "BSD-3-Clause": "Dual BSD/GPL",
    "MPL-1.1": "Dual MPL/GPL",
    "MPL-2.0": "Dual MPL/GPL",
}

EXAMPLES = ('"GPL-2.0-only" or "GPL-2.0-or-later" (-> "GPL"), "MIT OR GPL-2.0-only" (-> "Dual MIT/GPL"), '
            '"BSD-3-Clause OR GPL-2.0-only" (-> "Dual BSD/GPL"), "MPL-2.0 OR GPL-2.0-only" (-> "Dual MPL/GPL"), '
            '"GPL-2.0-only WITH <exception>" (-> "GPL and additional rights")')
ACCEPTED = ("SPDX expressions that offer the GPL v2: " + EXAMPLES + "; or the kernel's own strings: "
            + ", ".join(f'"{name}"' for name in KERNEL_LICENSES))

TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")


class _Parser:
    """SPDX expressions (SPDX 2.3 annex D) reduced to what MODULE_LICENSE can say: alternatives.
    Cargo's older `A/B` means `A OR B`."""

    def __init__(self, expression: str) -> None:
        self.tokens = TOKEN_RE.findall(expression.replace("/", " OR "))
        self.index = 0

    def _next(self) -> str | None:
        token = self.tokens[self.index] if self.index < len(self.tokens) else None
        self.index += token is not None
        return token

    def _peek(self) -> str | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def alternatives(self) -> list[tuple[str, str]] | None:
        """(identifier, exception) for each `OR` choice; None for `AND` or a malformed expression."""
        found = self._expression()
        return found if found and self._peek() is None else None

    def _expression(self) -> list[tuple[str, str]] | None:
        choices = self._atom()
        while choices is not None and self._peek() == "OR":
            self._next()
            more = self._atom()
            choices = None if more is None else choices + more
        return choices

    def _atom(self) -> list[tuple[str, str]] | None:
        token = self._next()
        if token == "(":
            inner = self._expression()
            return inner if self._next() == ")" else None
        if token is None or token in ("OR", "AND", "WITH", ")"):
            return None
        exception = ""
        if self._peek() == "WITH":
            self._next()
            exception = self._next() or ""
            if exception in ("", "(", ")", "OR", "AND", "WITH"):
                return None
        return [(token, exception)]


def from_spdx(expression: str) -> str | None:
    """The kernel's string for an SPDX expression, or None when none says it."""
    choices = _Parser(expression).alternatives()
    if choices is None:
        return None
    gpl = [exception for ident, exception in choices if ident in GPL2]
    if not gpl:
        return None
    if all(gpl):
        return "GPL and additional rights"
    # module.h: "There are dual licensed components, but when running with Linux it is the GPL
    # that is relevant": one Dual string when the other choices name its licence, else "GPL".
    duals = {DUAL.get(ident) for ident, _exception in choices if ident not in GPL2}
    return duals.pop() if len(duals) == 1 and None not in duals else "GPL"


def module_license(value: str | None, where: str) -> str:
    """What goes into MODULE_LICENSE for a crate licensed `value` (`where` says where it was set)."""
    if value is None or not value.strip():
        raise RustkoError(
            "the module has no licence: no `license` in Cargo.toml ([package] or "
            "[package.metadata.kernel]) and no license= argument",
            'add `license = "GPL-2.0-only"` under [package] in Cargo.toml (an SPDX expression, '
            'mapped to MODULE_LICENSE("GPL")), or pass license= to RustKernelModule; the kernel '
            "treats a module without one as proprietary")
    value = value.strip()
    if value in KERNEL_LICENSES:
        return value
    mapped = from_spdx(value)
    if mapped is None:
        raise RustkoError(
            f"licence {value!r} ({where}) has no MODULE_LICENSE string the kernel accepts: it would "
            f"taint the kernel as proprietary and the module could not use EXPORT_SYMBOL_GPL symbols",
            f"accepted: {ACCEPTED}. To ship a module under another licence anyway, set "
            '[package.metadata.kernel] license = "Proprietary"')
    return mapped
