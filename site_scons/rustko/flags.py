"""Rust code-generation flags for a target kernel, kept as data.

Each row mirrors a line of the kernel's own Makefiles (Linux 6.12 unless noted), so that Rust code
built here is compiled the way Kbuild compiles in-tree Rust for the same .config. Where Debian's
headers have no CONFIG_RUST, the rows still apply: they describe the kernel's ABI, not its Rust.

A row may hold for a range of rustc releases only, as Kbuild's `rustc-min-version` conditions
(scripts/Makefile.compiler, 6.12 and 7.3.4): the same option is spelled differently across
1.78 (the oldest rustc rustko supports) to today's, and a few kernel options need a newer rustc
than 1.78 at all (init/Kconfig `config RUST ... depends on`): such a row refuses the build.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from . import arch, cache
from .errors import RustkoError
from .kernel import KernelInfo
from .toolchain import Version, rustc_version


@dataclass(frozen=True)
class FlagRule:
    """Flags added when the kernel's .config matches; `{NAME}` expands to CONFIG_NAME's value."""

    flags: tuple[str, ...]
    source: str
    arches: tuple[str, ...] = ()   # empty: every architecture
    when: tuple[str, ...] = ()     # any of these CONFIG_ symbols is y (old and new spellings)
    unless: tuple[str, ...] = ()   # none of these is y
    rustc: tuple[str | None, str | None] = (None, None)  # [min, max): "1.93" is rustc-min-version,109300
    refuse: str = ""               # this rustc cannot build for such a kernel: why (the build stops)


def _in_range(rule: FlagRule, rustc: Version | None) -> bool:
    """Whether `rustc` lies in the rule's range; None (no rustc known) counts as the newest."""
    low, high = rule.rustc
    if rustc is None:
        return high is None
    return (low is None or rustc >= rustc_version(low)) and (high is None or rustc < rustc_version(high))


FLAG_RULES: tuple[FlagRule, ...] = (
    # Top-level Makefile, KBUILD_RUSTFLAGS := ...
    FlagRule(("-Cpanic=abort", "-Cforce-unwind-tables=n", "-Ccodegen-units=1",
              "-Csymbol-mangling-version=v0", "-Crelocation-model=static"),
             "Makefile: KBUILD_RUSTFLAGS := $(rust_common_flags) -Cpanic=abort ... -Crelocation-model=static"),
    FlagRule(("-Copt-level=2",), "Makefile: ifdef CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE KBUILD_RUSTFLAGS += -Copt-level=2",
             unless=("CC_OPTIMIZE_FOR_SIZE",)),
    FlagRule(("-Copt-level=s",), "Makefile: else ifdef CONFIG_CC_OPTIMIZE_FOR_SIZE KBUILD_RUSTFLAGS += -Copt-level=s",
             when=("CC_OPTIMIZE_FOR_SIZE",)),
    FlagRule(("-Cdebug-assertions=n", "-Coverflow-checks=n"),
             "Makefile: -Cdebug-assertions=$(if $(CONFIG_RUST_DEBUG_ASSERTIONS),y,n) (no CONFIG_RUST here: n)"),
    FlagRule(("-Cforce-frame-pointers=y",), "Makefile: ifdef CONFIG_FRAME_POINTER KBUILD_RUSTFLAGS += -Cforce-frame-pointers=y",
             when=("FRAME_POINTER",)),
    FlagRule(("-Cdebuginfo=2",), "scripts/Makefile.debug: DEBUG_RUSTFLAGS += -Cdebuginfo=2",
             when=("DEBUG_INFO",), unless=("DEBUG_INFO_REDUCED",)),
    FlagRule(("-Cdebuginfo=1",), "scripts/Makefile.debug: ifdef CONFIG_DEBUG_INFO_REDUCED DEBUG_RUSTFLAGS += -Cdebuginfo=1",
             when=("DEBUG_INFO_REDUCED",)),
    # rustko's own, measured: without -Zplt=yes rustc marks the LLVM module RtLibUseGOT and LLVM's
    # memset/memcpy calls go through R_X86_64_GOTPCREL, which the loader refuses.
    FlagRule(("-Zplt=yes",), "rustko: keeps libcalls (memset, memcpy) off the GOT; without it they go "
                             "through R_X86_64_GOTPCREL, which Debian's 6.1 refuses (Unknown rela relocation: 9)",
             arches=("x86_64", "um")),
    # arch/x86/Makefile
    FlagRule(("-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",),
             "arch/x86/Makefile: KBUILD_RUSTFLAGS += -Ctarget-feature=-sse,-sse2,...", arches=("x86_64",)),
    FlagRule(("-Cno-redzone=y", "-Ccode-model=kernel"),
             "arch/x86/Makefile: KBUILD_RUSTFLAGS += -Cno-redzone=y, -Ccode-model=kernel", arches=("x86_64",)),
    FlagRule(("-Ztune-cpu=generic",), "arch/x86/Makefile: rustflags-$(CONFIG_GENERIC_CPU) += -Ztune-cpu=generic",
             arches=("x86_64",), when=("GENERIC_CPU",)),
    # 7.3 has no CPU choice left but X86_NATIVE_CPU. -Ctarget-cpu=x86-64 is the builtin
    # x86_64-unknown-none's cpu, but not the kernel's target.json's (rustc's default, generic).
    # The `unless` list is 6.12's choice (arch/x86/Kconfig.cpu).
    FlagRule(("-Ctarget-cpu=x86-64", "-Ztune-cpu=generic"),
             "arch/x86/Makefile (7.3.4): ifdef CONFIG_X86_NATIVE_CPU ... else KBUILD_RUSTFLAGS += "
             "-Ctarget-cpu=x86-64 -Ztune-cpu=generic",
             arches=("x86_64",), when=("X86_64",),
             unless=("GENERIC_CPU", "X86_NATIVE_CPU", "MK8", "MPSC", "MCORE2", "MATOM")),
    # The kernel enables retpolines through its target.json, whatever the rustc:
    # scripts/generate_rust_target.rs (6.12, 7.3.4) if cfg.has("MITIGATION_RETPOLINE") { features
    # += ",+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls" }.
    # Later rustc has a flag for the three (rust-lang/rust#135927, 2025: 1.96 has it and warns on
    # the features; trixie's 1.85.1 lacks it, seen here); older rustc knows only the features (and
    # warns that they are unknown, as 1.78 does). 1.89 is the boundary by the PR's date.
    FlagRule(("-Zretpoline-external-thunk",),
             "scripts/generate_rust_target.rs (6.12, 7.3.4): MITIGATION_RETPOLINE -> features "
             "+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls "
             "(rustc >= 1.89: -Zretpoline-external-thunk, which enables the three)",
             arches=("x86_64",), when=("MITIGATION_RETPOLINE", "RETPOLINE"), rustc=("1.89", None)),
    FlagRule(("-Ctarget-feature=+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls",),
             "scripts/generate_rust_target.rs (6.12, 7.3.4): MITIGATION_RETPOLINE -> features "
             "+retpoline-external-thunk,+retpoline-indirect-branches,+retpoline-indirect-calls "
             "(rustc < 1.89 has no -Zretpoline-external-thunk)",
             arches=("x86_64",), when=("MITIGATION_RETPOLINE", "RETPOLINE"), rustc=(None, "1.89")),
    FlagRule(("-Zfunction-return=thunk-extern",),
             "arch/x86/Makefile (6.12, 7.3.4): ifdef CONFIG_MITIGATION_RETHUNK RETHUNK_RUSTFLAGS := "
             "-Zfunction-return=thunk-extern; 5.10.262 has C only: Makefile ifdef CONFIG_RETHUNK "
             "RETHUNK_CFLAGS := -mfunction-return=thunk-extern (the same __x86_return_thunk)",
             arches=("x86_64",), when=("MITIGATION_RETHUNK", "RETHUNK")),
    FlagRule(("-Zcf-protection=branch", "-Cjump-tables=n"),
             "arch/x86/Makefile (6.12, 7.3.4): ifeq ($(CONFIG_X86_KERNEL_IBT),y) KBUILD_RUSTFLAGS += -Zcf-protection=branch "
             "$(if $(call rustc-min-version,109300),-Cjump-tables=n,-Zno-jump-tables) (5.10 has no IBT)",
             arches=("x86_64",), when=("X86_KERNEL_IBT",), rustc=("1.93", None)),
    FlagRule(("-Zcf-protection=branch", "-Zno-jump-tables"),
             "arch/x86/Makefile (6.12, 7.3.4): ifeq ($(CONFIG_X86_KERNEL_IBT),y) KBUILD_RUSTFLAGS += -Zcf-protection=branch "
             "$(if $(call rustc-min-version,109300),-Cjump-tables=n,-Zno-jump-tables)",
             arches=("x86_64",), when=("X86_KERNEL_IBT",), rustc=(None, "1.93")),
    FlagRule(("-Zpatchable-function-entry={FUNCTION_PADDING_BYTES},{FUNCTION_PADDING_BYTES}",),
             "arch/x86/Makefile (6.12, 7.3.4): ifdef CONFIG_CALL_PADDING PADDING_RUSTFLAGS := "
             "-Zpatchable-function-entry=... (5.10 has no CALL_PADDING)",
             arches=("x86_64",), when=("CALL_PADDING",), rustc=("1.81", None)),
    FlagRule((), "init/Kconfig (6.12): config RUST ... depends on !CALL_PADDING || RUSTC_VERSION >= 108100",
             arches=("x86_64",), when=("CALL_PADDING",), rustc=(None, "1.81"),
             refuse="the kernel pads every function (CONFIG_CALL_PADDING) and rustc learnt "
                    "-Zpatchable-function-entry in 1.81"),
    # UML (arch/um/Makefile includes arch/x86/Makefile.um, never arch/x86/Makefile): no kernel
    # code model and no -mno-red-zone. UML's kernel is a host process linked at 0x60000000 and its
    # modules are vmalloc'ed above its physical memory (arch/um/include/asm/pgtable.h), at any
    # user-space address: C is built with -mcmodel=large, and so must Rust be (the default small
    # model overflows R_X86_64_32S, seeds/001). 6.12's arch/um/Makefile also adds
    # KBUILD_RUSTFLAGS += -Crelocation-model=pie, meant for the executable: modules keep the
    # top-level static model, since the loader refuses the GOTPCREL that PIE code uses (seeds/001).
    FlagRule(("-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",),
             "arch/x86/Makefile.um: ifeq ($(call gcc-min-version, 110000)$(CONFIG_CC_IS_CLANG),y) "
             "KBUILD_RUSTFLAGS += -Ctarget-feature=-sse,... (6.12; 6.1: Clang only)", arches=("um",)),
    FlagRule(("-Ccode-model=large",),
             "arch/um/Makefile: ifdef CONFIG_64BIT KBUILD_CFLAGS += -mcmodel=large (6.1, 6.12)",
             arches=("um",), when=("64BIT",)),
    FlagRule(("-Cno-redzone=n",),
             "arch/um/Makefile, arch/x86/Makefile.um: no -mno-red-zone, and 6.12's target.json "
             "(scripts/generate_rust_target.rs) no disable-redzone: UML's interrupts are host "
             "signals taken on a sigaltstack (arch/um/os-Linux/signal.c SA_ONSTACK), never over "
             "the red zone; x86_64-unknown-none would disable it",
             arches=("um",)),
    # arch/arm64/Makefile
    FlagRule(('-Ctarget-feature=-neon',),
             'arch/arm64/Makefile (6.12, 7.3.4): ifeq ($(call rustc-min-version, 108500),y) '
             '--target=aarch64-unknown-none-softfloat else --target=aarch64-unknown-none -Ctarget-feature="-neon"',
             arches=("arm64",), rustc=(None, "1.85")),
    FlagRule(("-Zbranch-protection=bti,pac-ret",),
             "arch/arm64/Makefile: ifeq ($(CONFIG_ARM64_BTI_KERNEL),y) KBUILD_RUSTFLAGS += -Zbranch-protection=bti,pac-ret",
             arches=("arm64",), when=("ARM64_BTI_KERNEL",)),
    FlagRule(("-Zbranch-protection=pac-ret",),
             "arch/arm64/Makefile: else ifeq ($(CONFIG_ARM64_PTR_AUTH_KERNEL),y) -Zbranch-protection=pac-ret",
             arches=("arm64",), when=("ARM64_PTR_AUTH_KERNEL",), unless=("ARM64_BTI_KERNEL",)),
    FlagRule(("-Zfixed-x18",), "arch/arm64/Makefile: ifeq ($(CONFIG_SHADOW_CALL_STACK),y) KBUILD_RUSTFLAGS += -Zfixed-x18",
             arches=("arm64",), when=("SHADOW_CALL_STACK",), rustc=("1.80", None)),
    FlagRule((), "arch/arm64/Kconfig (6.12): config RUSTC_SUPPORTS_ARM64 ... depends on !SHADOW_CALL_STACK || "
                 "RUSTC_VERSION >= 108200 || RUSTC_VERSION >= 108000 && UNWIND_PATCH_PAC_INTO_SCS",
             arches=("arm64",), when=("SHADOW_CALL_STACK",), rustc=(None, "1.80"),
             refuse="the kernel reserves x18 for its shadow call stack and rustc learnt -Zfixed-x18 in 1.80"),
    # The two rows below mirror 6.12 lines that Debian's arm64 configs (6.1, 6.12) do not enable.
    FlagRule(("-Zsanitizer=shadow-call-stack",),
             "Makefile: ifdef CONFIG_SHADOW_CALL_STACK / ifndef CONFIG_DYNAMIC_SCS KBUILD_RUSTFLAGS += "
             "-Zsanitizer=shadow-call-stack (rustc accepts it on arm64 only with -Zfixed-x18, above)",
             arches=("arm64",), when=("SHADOW_CALL_STACK",), unless=("DYNAMIC_SCS",)),
    FlagRule(("-Cforce-unwind-tables=y", "-Zuse-sync-unwind=n"),
             "arch/arm64/Makefile: ifeq ($(CONFIG_UNWIND_TABLES),y) KBUILD_RUSTFLAGS += -Cforce-unwind-tables=y "
             "-Zuse-sync-unwind=n (after the top-level -Cforce-unwind-tables=n: the last one wins)",
             arches=("arm64",), when=("UNWIND_TABLES",)),
    # arch/riscv/Makefile
    FlagRule(("-Ctarget-cpu=generic-rv64",), "arch/riscv/Makefile: KBUILD_RUSTFLAGS += -Ctarget-cpu=generic-rv64",
             arches=("riscv64",)),
    FlagRule(("-Ctarget-feature=-relax",), "arch/riscv/Makefile: KBUILD_CFLAGS_MODULE += -mno-relax (R_RISCV_ALIGN is refused)",
             arches=("riscv64",)),
)

# Codegen options a module's own rustflags may override that `core` must share: fat LTO refuses
# to link bitcode of different code models ("linking module flags 'Code Model': IDs have
# conflicting values"), and the others change how core addresses data or which instructions it uses.
SYSROOT_SHARED: tuple[str, ...] = ("code-model", "relocation-model", "target-feature", "target-cpu",
                                   "no-redzone")


def sysroot_shared(rustflags: Sequence[str]) -> list[str]:
    """The part of a module's rustflags its sysroot must be built with (`-Cx=y` or `-C x=y`)."""
    out: list[str] = []
    args = list(rustflags)
    for index, arg in enumerate(args):
        option = arg[2:] if arg.startswith("-C") and len(arg) > 2 else (
            args[index + 1] if arg == "-C" and index + 1 < len(args) else "")
        if option.partition("=")[0] in SYSROOT_SHARED:
            out.append(f"-C{option}")
    return out


def _applies(rule: FlagRule, kernel: KernelInfo, rustc: Version | None) -> bool:
    if rule.arches and kernel.arch not in rule.arches:
        return False
    if rule.when and not any(kernel.enabled(sym) for sym in rule.when):
        return False
    return not any(kernel.enabled(sym) for sym in rule.unless) and _in_range(rule, rustc)


def _rules(kernel: KernelInfo, rustc: str | None) -> list[FlagRule]:
    """The rows for this kernel and rustc (`-vV`'s release, e.g. "1.78.0"; None: the newest).
    A refusing row stops the build here, before any rustc runs."""
    version = rustc_version(rustc) if rustc else None
    rules = [rule for rule in FLAG_RULES if _applies(rule, kernel, version)]
    for rule in rules:
        if rule.refuse:
            raise RustkoError(
                f"rustc {rustc} cannot build modules for kernel {kernel.release}: {rule.refuse} ({rule.source})",
                f"use a rustc >= {rule.rustc[1]}: e.g. Debian 12's rustc-web with RUSTC=/usr/bin/rustc")
    return rules


def _expand(flag: str, kernel: KernelInfo) -> str:
    names = {part.split("}")[0] for part in flag.split("{")[1:]}
    return flag.format(**{name: kernel.value(name) or "" for name in names})


# Builtin targets that older rustc spell differently, per architecture: (below this rustc, that
# target, the kernel line). The -Ctarget-feature half of the old spelling is a FLAG_RULES row.
OLD_TARGETS: dict[str, tuple[str, str, str]] = {
    "arm64": ("1.85", "aarch64-unknown-none",
              'arch/arm64/Makefile (6.12, 7.3.4): ifeq ($(call rustc-min-version, 108500),y) '
              '--target=aarch64-unknown-none-softfloat else --target=aarch64-unknown-none -Ctarget-feature="-neon"'),
}


def _target(kernel: KernelInfo, rustc: str | None) -> tuple[str, str]:
    record = arch.resolve(kernel.arch)
    old = OLD_TARGETS.get(record.name)
    if old and rustc and rustc_version(rustc) < rustc_version(old[0]):
        return old[1], old[2]
    return record.rust_target, record.rust_target_source


def target(kernel: KernelInfo, rustc: str | None = None) -> str:
    """rustc's builtin target for `kernel` (`rustc`: the release that compiles; None: the newest)."""
    return _target(kernel, rustc)[0]


def codegen_flags(kernel: KernelInfo, rustc: str | None = None) -> list[str]:
    """The code-generation flags shared by the sysroot and the module crate, for `rustc` (the
    release, e.g. "1.78.0"; None: the newest spelling).

    Later flags win in rustc, so UML's large code model overrides nothing it should not: UML
    gets no `-Ccode-model=kernel` row at all.
    """
    flags = ["--target", target(kernel, rustc)]
    for rule in _rules(kernel, rustc):
        flags.extend(_expand(flag, kernel) for flag in rule.flags)
    return flags


def explain(kernel: KernelInfo, rustc: str | None = None) -> list[tuple[str, str]]:
    """(flag, kernel Makefile line it mirrors) for every flag chosen: `rustko doctor` shows this."""
    name, source = _target(kernel, rustc)
    rows = [(f"--target {name}", source)]
    for rule in _rules(kernel, rustc):
        rows.extend((_expand(flag, kernel), rule.source) for flag in rule.flags)
    return rows


def config_cfgs(kernel: KernelInfo) -> list[str]:
    """The kernel's configuration as rustc `--cfg`s, as Kbuild gives it to every in-tree Rust
    crate: `rust_flags = ... @$(objtree)/include/generated/rustc_cfg` (scripts/Makefile.lib,
    6.1 and 6.12), so `#[cfg(CONFIG_SMP)]` means what it means in the kernel.

    KDIRs made before kconfig wrote that file (kernels before 6.1) get the same lines derived
    from their .config, cached by content.
    """
    generated = kernel.kdir / "include" / "generated" / "rustc_cfg"
    if generated.is_file():
        return [f"@{generated}"]
    text = "".join(rustc_cfg_line(name, value) for name, value in sorted(kernel.config.items()))
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    folder = cache.cached_dir(cache.cache_root() / "rustc_cfg" / digest,
                              lambda tmp: (tmp / "rustc_cfg").write_text(text))
    return [f"@{folder / 'rustc_cfg'}"]


def rustc_cfg_line(name: str, value: str) -> str:
    """One .config value as kconfig writes it into rustc_cfg (scripts/kconfig/confdata.c
    print_symbol_for_rustccfg, 6.1 and 6.12): `y`/`m` also as a bare `--cfg=NAME` (IS_ENABLED),
    hex with its 0x, every value as an escaped string. .config strings are already quoted and
    escaped the same way (escape_string_value), so they are copied as they are.

    .config does not say a symbol's type, so a hex value written without 0x reads as an int:
    on Debian's 6.1 and 6.12 configs the one line that differs from the real rustc_cfg is
    CONFIG_MTD_NAND_DISKONCHIP_PROBE_ADDRESS="0" (kconfig: "0x0")."""
    if value in ("y", "m"):
        return f'--cfg={name}\n--cfg={name}="{value}"\n'
    if value == "n" or not value:
        return ""
    if not value.startswith('"'):
        value = f'"{value}"'
    return f"--cfg={name}={value}\n"
