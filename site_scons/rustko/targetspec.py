"""The target spec rustc compiles a module for: the kernel's own `target.json` where rustc accepts it,
else rustc's builtin target, and how the two compare field by field.

x86 kernels (and UML on x86_64) compile their Rust against the `target.json` that
`scripts/generate_rust_target.rs` writes from `include/config/auto.conf` (rust/Makefile in 6.1,
scripts/Makefile since 6.2; `--target=$(objtree)/scripts/target.json` in arch/x86/Makefile). Debian's
headers never ship that file (7.3.4+deb13 has CONFIG_RUST=y and still none), so rustko writes it
from the generator's logic kept here as data (`GENERATOR`), one row per field with the kernel source
it was read from. tests/test_targetspec.py compiles each kernel's real generator and checks the rows
against what it prints.

The generator decides a few spellings by the rustc the kernel is configured with
(`CONFIG_RUSTC_VERSION`, from `scripts/rustc-version.sh $(RUSTC)`): rustko answers them for the rustc
it runs, as Kconfig would had the kernel been configured with it. A spec that rustc refuses (6.1's:
a string `target-pointer-width` and a data layout without `i128:128`, which every rustc rustko supports
rejects) leaves rustko on the builtin target plus flags; `compare` says what that costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import cache
from .kernel import KernelInfo
from .toolchain import Toolchain

Version = tuple[int, int]


@dataclass(frozen=True)
class SpecRow:
    """One `ts.push(field, value)` of the kernel's generator (x86_64 branch), or one `features +=`."""

    field: str
    value: object
    source: str
    since: Version = (0, 0)             # kernel versions [since, until) whose generator has this line
    until: Version = (99, 0)
    when: str = ""                      # `cfg.has("WHEN")`: the symbol is set in auto.conf
    rustc: tuple[int, int] = (0, 999)   # `cfg.rustc_version_atleast`: rustc minor versions [lo, hi)


GEN = "scripts/generate_rust_target.rs"
S61 = f"{GEN} (6.1.192)"
S612 = f"{GEN} (6.12.117, 7.3.4)"
S73 = f"{GEN} (7.3.4)"
NEW: Version = (6, 12)  # the 6.12 generator (rustc_version_atleast, arrays); 6.1's is the old one

# In the generator's order: the order of the keys in its output.
GENERATOR: tuple[SpecRow, ...] = (
    SpecRow("arch", "x86_64", f"{GEN} (6.1.192, 6.12.117, 7.3.4): if cfg.has(\"X86_64\") ts.push(\"arch\", \"x86_64\")"),
    SpecRow("rustc-abi", "x86-softfloat", f"{S612}: else if cfg.rustc_version_atleast(1, 86, 0) "
            "ts.push(\"rustc-abi\", \"x86-softfloat\")", since=NEW, rustc=(86, 98)),
    SpecRow("rustc-abi", "softfloat", f"{S612}: if cfg.rustc_version_atleast(1, 98, 0) "
            "ts.push(\"rustc-abi\", \"softfloat\")", since=NEW, rustc=(98, 999)),
    SpecRow("data-layout", "e-m:e-p270:32:32-p271:32:32-p272:64:64-i64:64-f80:128-n8:16:32:64-S128",
            f"{S61}: ts.push(\"data-layout\", ...)", until=NEW),
    SpecRow("data-layout", "e-m:e-p270:32:32-p271:32:32-p272:64:64-i64:64-i128:128-f80:128-n8:16:32:64-S128",
            f"{S612}: ts.push(\"data-layout\", ...-i128:128-...)", since=NEW),
    SpecRow("features", "-3dnow,-3dnowa,-mmx,+soft-float", f"{S61}: let mut features = ...", until=NEW),
    SpecRow("features", "+retpoline-external-thunk", f"{S61}: if cfg.has(\"RETPOLINE\")",
            until=NEW, when="RETPOLINE"),
    SpecRow("features", "-mmx,+soft-float", f"{S612}: let mut features = ...", since=NEW),
    SpecRow("features", "+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls",
            f"{S612}: if cfg.has(\"MITIGATION_RETPOLINE\") (Clang's -mretpoline-external-thunk)",
            since=NEW, when="MITIGATION_RETPOLINE"),
    SpecRow("features", "+harden-sls-ijmp,+harden-sls-ret",
            f"{S612}: if cfg.has(\"MITIGATION_SLS\") (Clang's -mharden-sls=all)", since=NEW, when="MITIGATION_SLS"),
    SpecRow("features", "-apxf", f"{S73}: if cfg.has(\"X86_NATIVE_CPU\")", since=(7, 3), when="X86_NATIVE_CPU"),
    SpecRow("llvm-target", "x86_64-linux-gnu", f"{GEN} (6.1.192, 6.12.117, 7.3.4): ts.push(\"llvm-target\", ...)"),
    SpecRow("supported-sanitizers", ["kcfi", "kernel-address"], f"{S612}: ts.push(\"supported-sanitizers\", ...)",
            since=NEW),
    SpecRow("target-pointer-width", "64", f"{S61}: ts.push(\"target-pointer-width\", \"64\")", until=NEW),
    SpecRow("target-pointer-width", "64", f"{S612}: else ts.push(\"target-pointer-width\", \"64\")",
            since=NEW, rustc=(0, 91)),
    SpecRow("target-pointer-width", 64, f"{S612}: if cfg.rustc_version_atleast(1, 91, 0) "
            "ts.push(\"target-pointer-width\", 64)", since=NEW, rustc=(91, 999)),
    SpecRow("emit-debug-gdb-scripts", False, f"{GEN} (6.1.192, 6.12.117, 7.3.4)"),
    SpecRow("frame-pointer", "may-omit", f"{GEN} (6.1.192, 6.12.117, 7.3.4)"),
    SpecRow("stack-probes", {"kind": "none"}, f"{GEN} (6.1.192, 6.12.117, 7.3.4)"),
    SpecRow("target-endian", "big", f"{GEN} (6.1.192, 6.12.117, 7.3.4): if cfg.has(\"CPU_BIG_ENDIAN\")",
            when="CPU_BIG_ENDIAN"),
)

# The architectures whose kernels use the generated spec (arch/x86/Makefile, arch/x86/Makefile.um);
# the others name a builtin target in their Makefile (arch.Arch.rust_target_source).
GENERATED_FOR: tuple[str, ...] = ("x86_64", "um")
FIRST: Version = (6, 1)  # the first kernel with Rust (and the generator); 5.10 has neither

# What a field is when a spec does not set it (rustc_target::spec::TargetOptions::default, rustc
# 1.78 to 1.96), for the fields either side sets.
DEFAULTS: dict[str, object] = {
    "code-model": None, "relocation-model": "pic", "cpu": "generic", "features": "", "disable-redzone": False,
    "panic-strategy": "unwind", "frame-pointer": "may-omit", "stack-probes": {"kind": "none"},
    "plt-by-default": True, "emit-debug-gdb-scripts": True, "max-atomic-width": None, "target-endian": "little",
    "rustc-abi": None, "linker": None, "linker-flavor": "gnu-cc", "crt-objects-fallback": None,
    "position-independent-executables": False, "static-position-independent-executables": False,
    "relro-level": "none", "supported-sanitizers": [], "metadata": None,
}

# Fields that change no byte of a module: rustko never links with rustc (it writes a staticlib and
# runs `ld -r`), uses no sanitizer, and `metadata` is documentation. Every other field counts.
NO_CODE: dict[str, str] = {
    "linker": "rustc links nothing (staticlib, then ld -r)",
    "linker-flavor": "rustc links nothing (staticlib, then ld -r)",
    "crt-objects-fallback": "executables only",
    "position-independent-executables": "executables only",
    "static-position-independent-executables": "executables only",
    "relro-level": "executables only",
    "supported-sanitizers": "only gates -Zsanitizer=, which no kernel .config here asks for",
    "metadata": "description, not code",
}


def _row_applies(row: SpecRow, kernel: KernelInfo, rustc_minor: int) -> bool:
    version = kernel.version[:2]
    return (row.since <= version < row.until and row.rustc[0] <= rustc_minor < row.rustc[1]
            and (not row.when or f"CONFIG_{row.when}" in kernel.config))


def uses_generator(kernel: KernelInfo) -> bool:
    """Whether the kernel compiles its Rust against a generated target.json at all."""
    return (kernel.arch in GENERATED_FOR and kernel.version[:2] >= FIRST
            and "CONFIG_X86_64" in kernel.config)  # the generator's only branch rustko builds for


def rustc_minor(toolchain: Toolchain) -> int:
    return int(toolchain.version.split(".")[1])


def kernel_spec(kernel: KernelInfo, rustc_minor: int) -> dict[str, object] | None:
    """The target.json this kernel's generator writes when configured with rustc 1.`rustc_minor`
    (None: the kernel names a builtin target, or has no Rust)."""
    if not uses_generator(kernel):
        return None
    spec: dict[str, object] = {}
    for row in GENERATOR:
        if not _row_applies(row, kernel, rustc_minor):
            continue
        if row.field == "features" and "features" in spec:
            spec["features"] = f"{spec['features']},{row.value}"
        else:
            spec[row.field] = row.value
    return spec


def explain(kernel: KernelInfo, rustc_minor: int) -> list[tuple[str, str]]:
    """(field = value, generator line) for each row used: `rustko doctor` prints these."""
    return [(f"{row.field} = {json.dumps(row.value)}", row.source) for row in GENERATOR
            if uses_generator(kernel) and _row_applies(row, kernel, rustc_minor)]


# --- what rustc makes of a spec, and of the flags on top of it -------------------------------------


def _rustc_env() -> dict[str, str]:
    return {**os.environ, "RUSTC_BOOTSTRAP": "1"}


def printed(toolchain: Toolchain, target: str) -> tuple[dict[str, object] | None, str]:
    """rustc's `--print target-spec-json` of a builtin name or a .json path (the fields it sets
    beyond the defaults), or (None, rustc's complaint) when rustc refuses it."""
    proc = subprocess.run([str(toolchain.rustc), "-Zunstable-options", "--print", "target-spec-json",
                           "--target", target], capture_output=True, text=True, env=_rustc_env())
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        return None, (errors[0] if errors else proc.stderr.strip()).removeprefix("error: ")
    return json.loads(proc.stdout), ""


# rustc codegen options -> the spec field each one overrides (rustc_codegen_llvm and rustc_session
# read the option first, the target's field when it is absent).
FLAG_FIELDS: dict[str, str] = {
    "-Ccode-model": "code-model", "-Crelocation-model": "relocation-model", "-Ctarget-cpu": "cpu",
    "-Ctarget-feature": "features", "-Cno-redzone": "disable-redzone", "-Cpanic": "panic-strategy",
    "-Zplt": "plt-by-default", "-Cforce-frame-pointers": "frame-pointer",
    "-Zretpoline-external-thunk": "features",
}
RETPOLINE_FEATURES = "+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls"


def _features(text: object) -> dict[str, bool]:
    """`-a,+b,...` as the final sign of each feature (the last mention wins, as in LLVM)."""
    out: dict[str, bool] = {}
    for item in str(text or "").split(","):
        if item[:1] in "+-" and item[1:]:
            out[item[1:]] = item[0] == "+"
    return out


def effective(spec: dict[str, object], flags: Sequence[str]) -> dict[str, object]:
    """Every field of `spec` (defaults filled in) with `flags` applied: what the code is built for."""
    out = {**DEFAULTS, **spec}
    features = _features(out["features"])
    for flag in flags:
        name, _, value = flag.partition("=")
        field = FLAG_FIELDS.get(name)
        if field is None:
            continue
        if name == "-Zretpoline-external-thunk":
            features.update(_features(RETPOLINE_FEATURES))
        elif field == "features":
            features.update(_features(value))
        elif field in ("disable-redzone", "plt-by-default"):
            out[field] = value in ("y", "yes", "on", "true", "")
        elif field == "frame-pointer":
            out[field] = "always" if value in ("y", "yes", "on", "true", "") else out[field]
        else:
            out[field] = value
    out["features"] = features
    # Spellings of one value: a pointer width as text (rustc < 1.91) or number; no atomic width
    # means the pointer width (rustc_target Target::max_atomic_width).
    out["target-pointer-width"] = int(str(out.get("target-pointer-width", 64)))
    if out["max-atomic-width"] is None:
        out["max-atomic-width"] = out["target-pointer-width"]
    return out


@dataclass(frozen=True)
class Difference:
    field: str
    builtin: object   # rustc's builtin target with rustko's flags
    kernel: object    # the kernel's target.json with the same flags
    code: bool        # changes generated code (else: why not, in NO_CODE)


def differences(builtin: dict[str, object], kernel: dict[str, object], flags: Sequence[str]) -> list[Difference]:
    """Every field where the builtin target plus `flags` and the kernel's spec plus `flags` differ."""
    left, right = effective(builtin, flags), effective(kernel, flags)
    out: list[Difference] = []
    for field in sorted(set(left) | set(right)):
        a, b = left.get(field, DEFAULTS.get(field)), right.get(field, DEFAULTS.get(field))
        if field == "features":  # only the features whose final sign differs
            mine, theirs = dict(a), dict(b)  # type: ignore[call-overload]
            a = {name: on for name, on in mine.items() if theirs.get(name) != on}
            b = {name: on for name, on in theirs.items() if mine.get(name) != on}
        if a != b:
            out.append(Difference(field, a, b, field not in NO_CODE))
    return out


# --- the spec a build uses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The kernel's target.json a build passes as `--target`, or why it keeps the builtin target."""

    path: Path | None                    # the kernel's target.json in the cache (None: the builtin)
    kernel: dict[str, object] | None     # the kernel's spec (None: the kernel names a builtin)
    refused: str                         # rustc's refusal of the kernel's spec ("" when accepted)

    @property
    def custom(self) -> bool:
        return self.path is not None


def render(spec: dict[str, object]) -> str:
    """JSON text with the generator's key order."""
    return json.dumps(spec, indent=4) + "\n"


def _write(spec: dict[str, object], toolchain: Toolchain) -> tuple[Path, str]:
    """The spec as `<cache>/targetspec/<digest>/target.json` (named `target.json` like the kernel's,
    so the target's name is `target`), and rustc's refusal of it ("" when accepted), checked once
    per spec and rustc."""
    text = render(spec)
    digest = hashlib.sha256((toolchain.verbose_version + "\0" + text).encode()).hexdigest()[:24]

    def fill(tmp: Path) -> None:
        (tmp / "target.json").write_text(text)
        _, refused = printed(toolchain, str(tmp / "target.json"))
        (tmp / "refused.txt").write_text(refused)

    folder = cache.cached_dir(cache.cache_root() / "targetspec" / digest, fill)
    return folder / "target.json", (folder / "refused.txt").read_text()


def choose(kernel: KernelInfo, toolchain: Toolchain) -> Choice:
    """The kernel's own target.json when its kernel uses one and rustc accepts it, else the builtin."""
    spec = kernel_spec(kernel, rustc_minor(toolchain))
    if spec is None:
        return Choice(None, None, "")
    path, refused = _write(spec, toolchain)
    return Choice(None if refused else path, spec, refused)


def apply(choice: Choice, flags: Sequence[str]) -> list[str]:
    """`flags` (flags.codegen_flags: `--target BUILTIN` first) with the kernel's target.json instead
    of the builtin, when chosen. A custom target needs `-Zunstable-options` (RUSTC_BOOTSTRAP is set
    for every rustc rustko runs, as the kernel's Makefile exports it)."""
    if choice.path is None:
        return list(flags)
    assert flags[0] == "--target", flags  # codegen_flags' first pair
    return ["--target", str(choice.path), "-Zunstable-options", *flags[2:]]


def target_name(flags: Sequence[str]) -> str:
    """The name of the `--target` in `flags`, where rustc looks in a sysroot: lib/rustlib/<name>
    (a spec file's stem, `target` for the kernel's target.json)."""
    target = flags[flags.index("--target") + 1]
    return Path(target).stem if target.endswith(".json") else target


def portable(flags: Sequence[str]) -> list[str]:
    """`flags` with the kernel's target.json named relative to the cache (`<cache>/targetspec/...`):
    its digest says what it holds, and build records then match across caches."""
    root = str(cache.cache_root())
    return [f"<cache>{flag[len(root):]}" if flag.startswith(f"{root}/targetspec/") else flag for flag in flags]
