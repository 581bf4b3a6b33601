"""Findings and how they are shown: cargo-style text for people, JSON for tools."""

from __future__ import annotations

import re
from pathlib import Path

from .record import Slotted


class Finding(Slotted):
    """One reason the loader would refuse a module (or, severity "warning", taint it).

    A plain class with slots, not a dataclass: `dataclasses` (and the `inspect` it imports)
    would cost every `rustko check` about a tenth of its start-up."""

    # In this order: the positional arguments, the `--json` keys, `repr`.
    FIELDS = ("path", "stage", "kind", "kernel", "hint", "symbol", "section", "offset", "reloc_type",
              "reloc_name", "count", "explanation", "function", "source", "inlined", "severity",
              "errno")
    __slots__ = FIELDS

    def __init__(self, path: str, stage: str, kind: str, kernel: list[str], hint: str,
                 symbol: str = "", section: str = "", offset: int | None = None,
                 reloc_type: int | None = None, reloc_name: str = "", count: int = 1,
                 explanation: str = "", function: str = "", source: str = "",
                 inlined: list[str] | None = None, severity: str = "error", errno: str = "") -> None:
        self.path = path
        # "signature" | "module" | "vermagic" | "percpu" | "symbol" | "relocation" | "export"
        self.stage = stage
        self.kind = kind
        self.kernel = kernel  # the lines the kernel prints; unknowable values as <val>/<loc>
        self.hint = hint
        self.symbol = symbol
        self.section = section
        self.offset = offset
        self.reloc_type = reloc_type
        self.reloc_name = reloc_name
        self.count = count
        self.explanation = explanation
        self.function = function
        self.source = source
        # The calls inlined into `function` at `source`, innermost first ("name at file:line").
        self.inlined = [] if inlined is None else inlined
        self.severity = severity
        # The error the loader returns (insmod shows it in its own words), e.g. "ENOEXEC".
        self.errno = errno

    def as_dict(self) -> dict[str, object]:
        """Every field by name, lists copied (what `dataclasses.asdict` gave)."""
        return {name: list(value) if isinstance(value, list) else value
                for name, value in zip(self.FIELDS, self._values())}

    def kernel_regex(self) -> re.Pattern[str]:
        """A pattern matching the kernel's real lines (values the checker cannot know wildcarded)."""
        parts = [re.escape(line) for line in self.kernel]
        # A serial console ends lines with \r\n, and each line may carry printk's timestamp.
        text = r"\r?\n(?:\[ *\d+\.\d+\] )?".join(parts)
        for placeholder in ("<val>", "<loc>"):
            text = text.replace(re.escape(placeholder), "[0-9a-fx()ptrvl]+")
        return re.compile(text)


def format_report(findings: list[Finding], path: str | Path) -> str:
    """Compact, cargo-style text for one module's findings ("" when there are none)."""
    errors = [f for f in findings if f.severity == "error"]
    if not findings:
        return ""
    lines = [f"{'error: module would be refused' if errors else 'warning: module taints the kernel'}: {path}"]
    said: set[str] = set()
    for f in findings:
        if f.reloc_name:
            where = f"{f.section}+{f.offset:#x}" if f.offset is not None else f.section
            more = f" ({f.count} sites)" if f.count > 1 else ""
            against = f" against {f.symbol}" if f.symbol else ""
            lines.append(f"  --> {where}  {f.reloc_name} ({f.reloc_type}){against}{more}")
            if f.function or f.source:
                lines.append(f"   |  in {f.function or '?'}" + (f" at {f.source}" if f.source else ""))
                for frame in f.inlined:
                    lines.append(f"   |    inlined from {frame}")
        elif f.symbol:
            lines.append(f"  --> symbol {f.symbol}  ({f.kind})")
        else:
            lines.append(f"  --> {f.kind}")
        for text in f.kernel:
            lines.append(f"  = kernel: {text}")
        if f.errno and not f.kernel:
            lines.append(f"  = kernel: (no line; the load fails with {f.errno})")
        if f.explanation:
            lines.append(f"  = note: {f.explanation}" if f.explanation not in said
                         else "  = note: as above")
            said.add(f.explanation)
        if f.hint:
            lines.append(f"  = help: {f.hint}" if f.hint not in said else "  = help: as above")
            said.add(f.hint)
    return "\n".join(lines)




def results_json(results: list[tuple[str, list[Finding] | str]]) -> dict[str, object]:
    """The `--json` document: one entry per module, a refusal count, unreadable inputs apart."""
    refused = sum(1 for _, r in results if not isinstance(r, str) and is_refused(r))
    return {
        "modules": [{"path": p, "error": r} if isinstance(r, str) else
                    {"path": p, "loadable": not is_refused(r), "findings": [f.as_dict() for f in r]}
                    for p, r in results],
        "checked": len(results), "refused": refused,
        "unreadable": sum(1 for _, r in results if isinstance(r, str)),
    }


def is_refused(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
