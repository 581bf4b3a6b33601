"""`rustko doctor`: what rustko sees on this machine for a KDIR, and what is missing.

Prints the kernel, the compiler, the target spec (the kernel's own target.json or rustc's builtin
target, field by field), every Rust flag with the kernel Makefile line it mirrors, the sysroot cache
entry, and the tools each step needs. Exit 0 when a build can run, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil

from . import arch, build, flags, roots, sysroot, targetspec
from .errors import RustkoError
from .kernel import KernelInfo, normalize_arch

# (step, program, Debian package): the programs each step runs.
TOOLS: tuple[tuple[str, str, str], ...] = (
    ("kbuild", "make", "make"),
    ("vmtest", "busybox", "busybox-static"),
    ("vmtest", "cpio", "cpio"),
)


def _vm_tools(name: str) -> tuple[tuple[str, str, str], ...]:
    """The emulator `rustko vmtest` boots this architecture's kernel in; UML needs none."""
    vm = arch.resolve(name).vm
    if vm is None or vm.uml:
        return ()
    return (("vmtest", vm.command[0], vm.package),)


def _line(ok: bool, label: str, detail: str) -> str:
    return f"  [{'ok' if ok else '!!'}] {label:<16} {detail}"


# What a KDIR holds when its kernel's own Rust can be built against (rust/Makefile, 6.1 to 7.3):
# the crates' metadata and the target spec the kernel compiled them for.
RUST_OUTPUTS: tuple[str, ...] = ("rust/libkernel.rmeta", "rust/libcore.rmeta", "scripts/target.json")


def kernel_rust(kernel: KernelInfo) -> list[tuple[str, str]]:
    """What the KDIR says about the kernel's own Rust, in plain words."""
    if not kernel.enabled("RUST"):
        return [("kernel Rust", "CONFIG_RUST is not set: rustko's own sysroot and support crate are used")]
    version = kernel.value("RUSTC_VERSION_TEXT") or "an unknown rustc"
    present = [name for name in RUST_OUTPUTS if (kernel.kdir / name).exists()]
    if present:
        return [("kernel Rust", f"CONFIG_RUST=y (built with {version}); KDIR has {', '.join(present)}")]
    return [("kernel Rust", f"CONFIG_RUST=y (built with {version}), but KDIR has no Rust build outputs "
                            f"(no {', '.join(RUST_OUTPUTS)}): the kernel's own crates cannot be used from "
                            "these headers, so rustko uses its own sysroot (core, alloc) and support crate")]


def kbuild_place(kernel: KernelInfo) -> list[tuple[str, str]]:
    """Where Kbuild runs: on the host, or in the Debian root of the kernel's own release."""
    root = roots.owning(kernel.kdir)
    if root is None:
        return [("Kbuild", "runs on this host")]
    return [("Kbuild", f"runs in the Debian root {root} (unshare + chroot; the kernel's own "
                       f"compiler: {kernel.compiler})")]


def print_spec(target: build.Target) -> None:
    """The --target in use, where it comes from, and what it changes against the other choice."""
    choice, kernel, tools = target.spec, target.kernel, target.toolchain
    builtin = arch.resolve(kernel.arch).rust_target if choice.custom else targetspec.target_name(target.flags)
    minor = targetspec.rustc_minor(tools)
    if choice.custom:
        print(f"target spec: the kernel's own target.json, written from scripts/generate_rust_target.rs's "
              f"logic for this .config and rustc {tools.version}: {choice.path}")
    elif choice.kernel is None:
        why = (f"Linux {kernel.version[0]}.{kernel.version[1]} predates Rust and its generated target.json"
               if kernel.arch in targetspec.GENERATED_FOR else arch.resolve(kernel.arch).rust_target_source)
        print(f"target spec: rustc's builtin {builtin} ({why})")
    else:
        print(f"target spec: rustc's builtin {builtin} plus flags: rustc {tools.version} refuses the target.json "
              f"this kernel's generator writes ({choice.refused})")
    for field, source in targetspec.explain(kernel, minor):
        print(f"  {field:<48} {source}")
    if choice.kernel is None:
        return
    builtin_spec, _ = targetspec.printed(tools, builtin)
    kernel_spec, _ = targetspec.printed(tools, str(choice.path)) if choice.path else (choice.kernel, "")
    rest = [flag for flag in target.flags[2:] if flag != "-Zunstable-options"]
    changed = [d for d in targetspec.differences(builtin_spec or {}, kernel_spec or {}, rest) if d.code]
    if changed:
        print(f"  kernel's target.json against {builtin} (both with the flags below), fields that change code:")
    for diff in changed:
        mark = "used" if choice.custom else "NOT used"
        print(f"    {diff.field:<24} kernel {json.dumps(diff.kernel)}, builtin {json.dumps(diff.builtin)} "
              f"(the kernel's value {mark})")


def run(args: argparse.Namespace) -> int:
    options = build.Options(kdir=args.kdir, arch=args.arch, rustc=args.rustc, rust_lib_src=args.rust_lib_src)
    problems = 0
    print("rustko doctor")
    try:
        target = build.resolve(options)
    except RustkoError as err:
        print(_line(False, "target", err.message))
        if err.hint:
            print(f"       {err.hint}")
        return 1
    kernel, tools = target.kernel, target.toolchain
    print(_line(True, "KDIR", str(kernel.kdir)))
    print(_line(True, "kernel", f"{kernel.release} ({'.'.join(map(str, kernel.version))}, {kernel.arch}), "
                                f"built by {kernel.compiler}"))
    print(_line(kernel.symvers.is_file(), "Module.symvers",
                "present" if kernel.symvers.is_file() else "missing: symbol checks and modversions cannot work"))
    problems += not kernel.symvers.is_file()
    for label, detail in kernel_rust(kernel) + kbuild_place(kernel):
        print(_line(True, label, detail))
    print(_line(True, "rustc", f"{tools.rustc} {tools.version}, library sources {tools.lib_src}"))
    entry = sysroot.location(target.sysroot_key)
    print(_line(True, "sysroot", f"{entry} ({'cached' if entry.is_dir() else 'built on the first build, about 40 s on 2 cores'})"))
    cross = arch.default_cross_compile(kernel.arch)
    for step, program, package in (*TOOLS, *_vm_tools(kernel.arch), ("link", target.linker, "binutils"),
                                   ("kbuild", f"{cross}gcc", arch.toolchain_package(kernel.arch))):
        found = shutil.which(program)
        problems += found is None and step != "vmtest"
        print(_line(found is not None, program, f"{found or f'not found (apt-get install {package})'}  [{step}]"))
    print_spec(target)
    print("flags (each mirrors the kernel Makefile line after it):")
    for flag, source in flags.explain(kernel, tools.version):
        if flag.startswith("--target ") and target.spec.custom:
            flag, source = (f"--target {target.spec.path} -Zunstable-options",
                            "arch/x86/Makefile (6.12, 7.3.4): KBUILD_RUSTFLAGS += --target=$(objtree)/scripts/target.json "
                            "(a custom target needs -Zunstable-options)")
        print(f"  {flag:<48} {source}")
    for flag in flags.config_cfgs(kernel):
        print(f"  {flag:<48} scripts/Makefile.lib: rust_flags = ... @$(objtree)/include/generated/rustc_cfg "
              "(the module's crates: #[cfg(CONFIG_...)])")
    return 1 if problems else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="show what rustko sees for a KDIR and what is missing",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kdir", help="kernel build directory (default: the running kernel's)")
    parser.add_argument("--arch", type=normalize_arch, help="expected architecture (x86_64, arm64, um)")
    parser.add_argument("--rustc", help="rustc to use (default: the first with library sources)")
    parser.add_argument("--rust-lib-src", help="that rustc's `library` sources")
    parser.set_defaults(run=run)
