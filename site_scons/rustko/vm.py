"""`rustko vmtest`: boot a real kernel under QEMU (TCG), insmod and rmmod modules, report the log.

User-Mode Linux needs no QEMU: its kernel is a host program, run with the same initramfs.

A static loadability check can only predict what the kernel's loader does; this runs it. The
guest is a throw-away busybox initramfs whose `/init` reports every step on the serial console
between markers that carry a per-run random token, so the host recovers the results reliably
even when kernel messages interleave with them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import arch as arches
from . import debian
from .arch import Arch
from .cache import cache_root, cached_dir
from .errors import RustkoError
from .pvh import boot_image


# Lines the kernel's module loader prints when it refuses a module (kernel/module/main.c,
# arch/x86/kernel/module.c, arch/arm64/kernel/module.c, kernel/params.c in 6.1 and 6.12).
REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"Unknown rela relocation: \d+",
        r"unsupported RELA relocation: \d+",
        r"overflow in relocation type \d+",
        r"Invalid relocation target, existing value is nonzero",
        r"version magic '.*' should be '.*'",
        r"Unknown symbol \S+ \(err -?\d+\)",
        r"disagrees about version of symbol",
        r"no symbol version for",
        r"section size must match the kernel's built struct module size",
        r"module PLT section\(s\) missing",
        r"Unknown parameter `",
        r"Invalid ELF header magic",
        r"Module has invalid ELF structures",
        r"Exported symbol \S+ already",
    )
)

# Kernel log lines that mean the guest kernel itself broke while the module was in it.
CRASH_PATTERN = re.compile(
    r"Kernel panic - not syncing|\bOops\b|BUG: |general protection fault|"
    r"WARNING: CPU: |Call Trace:|kernel BUG at|Unable to handle kernel|"
    r"^RIP: 0010:|^pc : "
)

# The kernel command line of every guest (QEMU's also gets its console and panic=-1, so that a
# panic ends the run at once): only what a module test needs, as bench/vmtest.py measures against
# a naive `console=ttyS0 panic=-1` boot.
BOOT_PARAMS: tuple[str, ...] = (
    "loglevel=4",         # errors only on the slow serial console; the module's lines come from dmesg
    # crypto/testmgr.c (6.1, 6.12): module_param(notests) skips the self-test of every algorithm
    # registered at boot (alg_test returns 0: "alg: self-tests disabled"), about a sixth of a TCG
    # boot of Debian's 6.1; algorithms and module signature checks work as before.
    "cryptomgr.notests",
    # arch/x86/kernel/apic/io_apic.c (6.1..7.3) check_timer: on a loaded host a TCG guest's timer
    # can miss the check's window and the boot panics ("IO-APIC + timer doesn't work!", seen here
    # twice at load average 10); no_timer_check skips the check. Kernels without it (arm64, UML)
    # hand the word to /init as an argument, which /init ignores.
    "no_timer_check",
)

# Kernel log lines that the timing of a TCG boot scatters into any window, module or not.
BOOT_NOISE = re.compile(r"^(tsc|clocksource|sched_clock|random): ")

DMESG_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")


@dataclass
class VmResult:
    """What happened in the guest; `ok` is the verdict `rustko vmtest` exits on."""

    module: str
    kernel: Path
    arch: str
    loaded: bool = False
    unloaded: bool = False
    module_log: list[str] = field(default_factory=list)
    refusal: str | None = None
    insmod_error: str | None = None
    rmmod_error: str | None = None
    commands: list[tuple[str, int, str]] = field(default_factory=list)
    crash: list[str] = field(default_factory=list)
    failure: str | None = None  # why the run itself did not finish (timeout, early power-off)
    seconds: float = 0.0
    console: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.loaded
            and self.unloaded
            and all(status == 0 for _, status, _ in self.commands)
            and not self.crash
            and self.failure is None
        )


def resolve_arch(name: str) -> Arch:
    """The architecture record for any accepted spelling, if vmtest can boot it."""
    found = arches.resolve(name) if name.lower() in arches.ALIASES else None
    if found is None or found.vm is None:
        raise RustkoError(f"vmtest does not support architecture {name!r}",
                          hint=f"use one of: {', '.join(_bootable())}")
    return found


# --- the module --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleInfo:
    """The facts about a `.ko` that choose the kernel and the rmmod name."""

    path: Path
    name: str
    vermagic: str
    elf_machine: str

    @property
    def release(self) -> str:
        return self.vermagic.split()[0] if self.vermagic else ""


def read_module(path: Path) -> ModuleInfo:
    """Read `.modinfo` (name, vermagic) and the ELF machine; unreadable input is exit 2."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as handle:
            elf = ELFFile(handle)
            machine = elf["e_machine"]
            section = elf.get_section_by_name(".modinfo")
            raw = section.data() if section is not None else b""
    except OSError as err:
        raise RustkoError(f"cannot read module {path}: {err.strerror}") from None
    except ELFError as err:
        raise RustkoError(f"{path} is not an ELF kernel module: {err}") from None
    if section is None:
        raise RustkoError(
            f"{path} has no .modinfo section, so it is not a kernel module",
            hint="pass the final .ko that Kbuild links, not an intermediate .o",
        )
    info: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep and key not in info:
            info[key] = value
    name = info.get("name") or path.name.split(".")[0].replace("-", "_")
    return ModuleInfo(path=path, name=name, vermagic=info.get("vermagic", ""), elf_machine=machine)


# --- Debian packages ---------------------------------------------------------------------------


def _require_tool(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise RustkoError(f"{tool} is not installed", hint=f"apt-get install {package}")
    return found


# Debian's packages of a kernel without the Secure Boot signature, by generation, with the path
# of the kernel image inside: never installed, only unpacked, so no boot hooks run here.
IMAGE_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("linux-image-{release}-unsigned", "boot/vmlinuz-{release}"),  # 5.10 to 6.x (seen: 5.10, 6.1, 6.12)
    ("linux-binary-unsigned-{release}", "usr/lib/modules/{release}/vmlinuz.unsigned"),  # 7.x (seen: 7.3.4+deb13)
)


def image_packages(release: str) -> tuple[str, ...]:
    if not re.fullmatch(r"[0-9][A-Za-z0-9.+~_-]*", release):
        raise RustkoError(f"{release!r} is not a kernel release")
    return tuple(name.format(release=release) for name, _ in IMAGE_LAYOUTS)


def _image_deb(release: str, debian_arch: str, download: Path) -> tuple[Path, str]:
    """The unsigned image .deb of `release` (from the host's apt, or the Debian release that has
    it) and the kernel image's path inside it."""
    hint = "run `apt-get update`, or pass --kernel VMLINUZ"
    names = image_packages(release)
    images = {name: image.format(release=release) for name, (_, image) in zip(names, IMAGE_LAYOUTS)}
    for name in names:
        found = sorted((cache_root() / "debs").glob(f"{name}_*_{debian_arch}.deb"))
        if found:
            return found[-1], images[name]
    suite, name = debian.find(names, debian_arch, debian.release_hint(release))
    own = None if suite == debian.host_release() else suite
    return debian.download(name, debian_arch, download, own, hint), images[name]


def debian_kernel(release: str, arch: str = "x86_64") -> Path:
    """The vmlinuz of Debian's kernel `release`, fetched once into the cache."""
    spec = resolve_arch(arch)

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
            deb, path = _image_deb(release, spec.debian, Path(download))
            debian.extract(deb, tmp, [f"./{path}"])
            (tmp / "boot").mkdir(exist_ok=True)
            if path != f"boot/vmlinuz-{release}":
                os.replace(tmp / path, tmp / "boot" / f"vmlinuz-{release}")

    folder = cached_dir(cache_root() / "kernels" / spec.debian / release, fill)
    vmlinuz = folder / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise RustkoError(f"{image_packages(release)[0]} has no boot/vmlinuz-{release}; "
                          f"the cache at {folder} is stale")
    return vmlinuz


def debian_modules(release: str, arch: str = "x86_64") -> Path:
    """`lib/modules/RELEASE` of Debian's kernel `release`, fetched once into the cache.

    Every module Debian ships for that kernel: thousands of real, loadable objects, the corpus on
    which a loadability check must find nothing.
    """
    spec = resolve_arch(arch)

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
            deb, _ = _image_deb(release, spec.debian, Path(download))
            debian.extract(deb, tmp, ["./lib/modules"])

    folder = cached_dir(cache_root() / "modules" / spec.debian / release, fill)
    tree = folder / "lib" / "modules" / release
    if not tree.is_dir():
        raise RustkoError(f"{image_packages(release)[0]} has no lib/modules/{release}; "
                          f"the cache at {folder} is stale")
    return tree


# --- the initramfs -----------------------------------------------------------------------------


class Cpio:
    """A `newc` cpio archive, written without root: device nodes are just header fields."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.inode += 1
        self.buffer.write(header + encoded)
        self.buffer.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buffer.write(data)
        self.buffer.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def gzipped(self) -> bytes:
        """Close the archive; gzip members concatenate, so each part is compressed alone."""
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buffer.getvalue(), compresslevel=6, mtime=0)


def _busybox(spec: Arch) -> bytes:
    """A static busybox for the guest: the host's when it runs natively, else Debian's package."""
    if arches.runs_natively(spec):
        host = Path("/bin/busybox")
        if not host.is_file():
            raise RustkoError("busybox is not installed", hint="apt-get install busybox-static")
        return host.read_bytes()

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rustko-deb-") as download:
            hint = f"run `dpkg --add-architecture {spec.debian} && apt-get update`, or pass --kernel"
            deb = debian.download("busybox-static", spec.debian, Path(download), hint=hint)
            debian.extract(deb, tmp, ["./bin/busybox"])

    folder = cached_dir(cache_root() / "busybox" / spec.debian, fill)
    return (folder / "bin" / "busybox").read_bytes()


def base_initramfs(spec: Arch) -> Path:
    """The busybox part of every guest, built once per busybox binary and reused."""
    busybox = _busybox(spec)
    key = hashlib.sha256(busybox).hexdigest()[:16]

    def fill(tmp: Path) -> None:
        archive = Cpio()
        for folder in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "rustko"):
            archive.directory(folder)
        archive.chardev("dev/console", 5, 1)  # the kernel opens it for /init's stdio
        archive.file("bin/busybox", busybox, 0o755)
        archive.symlink("bin/sh", "busybox")
        (tmp / "base.cpio.gz").write_bytes(archive.gzipped())

    return cached_dir(cache_root() / "initramfs" / f"{spec.debian}-{key}", fill) / "base.cpio.gz"


def kmsg_marker(token: str) -> str:
    """The kernel log line written just before insmod; unlike the console markers, so they never mix."""
    return f"rustko {token}: insmod"


@dataclass(frozen=True)
class Load:
    """One module of a boot: the commands run while it is loaded and its insmod parameters."""

    module: ModuleInfo
    commands: Sequence[str] = ()
    params: Sequence[str] = ()


# The start of every guest /init: busybox's applets, /proc, /sys and /dev.
GUEST_PREAMBLE: tuple[str, ...] = (
    "#!/bin/sh",
    "/bin/busybox mount -t proc proc /proc",
    "/bin/busybox --install -s",
    "export PATH=/sbin:/bin:/usr/sbin:/usr/bin",
    "mount -t sysfs sysfs /sys",
    "mount -t devtmpfs devtmpfs /dev",
)


def init_script(loads: Sequence[tuple[str, Load]]) -> str:
    """The guest's /init: for each module in turn, each step's output framed by `@@<token>:TAG`
    lines on the console, the module's own token.

    Outputs go to a file first and are printed after, so kernel messages printed while a step
    runs land outside the frame. The kernel log gets a marker before each insmod and is printed
    after each module's rmmod, so a module's lines are exactly those after its marker.
    """
    lines = [
        *GUEST_PREAMBLE,
        "say() { printf '\\n@@%s\\n' \"$*\"; }",
        "step() { tag=$1; shift; \"$@\" >/tmp/out 2>&1; rc=$?; say \"$tag $rc\"; cat /tmp/out; say \"${tag%%:*}:END\"; return $rc; }",
    ]
    for token, load in loads:
        folder = f"/rustko/{token}"
        params = "".join(" " + shlex.quote(p) for p in load.params)
        lines += [
            f"say {token}:BOOTED",
            f"echo '{kmsg_marker(token)}' >/dev/kmsg",
            f"if step {token}:INSMOD insmod {folder}/{load.module.path.name}{params}; then",
            *(f"  step {token}:CMD{index} sh {folder}/cmd{index}" for index in range(len(load.commands))),
            f"  step {token}:RMMOD rmmod {load.module.name}",
            "fi",
            f"say {token}:DMESG",
            # The kernel's banner (which names it) and the lines from the marker on: the boot's few
            # hundred other lines would only slow the serial console.
            "dmesg | grep -m 1 ' Linux version '",
            f"dmesg | sed -n '/{kmsg_marker(token)}/,$p'",
            f"say {token}:END",
            f"say {token}:DONE",
        ]
    lines.append("poweroff -f")
    return "\n".join(lines) + "\n"


def run_initramfs(loads: Sequence[tuple[str, Load]]) -> bytes:
    """The per-run part: /init, and each module with its commands in a folder named by its token;
    appended to the cached base."""
    archive = Cpio()
    archive.file("init", init_script(loads).encode(), 0o755)
    for token, load in loads:
        archive.directory(f"rustko/{token}")
        archive.file(f"rustko/{token}/{load.module.path.name}", load.module.path.read_bytes())
        for index, command in enumerate(load.commands):
            archive.file(f"rustko/{token}/cmd{index}", (command + "\n").encode(), 0o755)
    return archive.gzipped()


# --- running and reading the console -----------------------------------------------------------


def parse_console(console: str, token: str, result: VmResult, commands: Sequence[str]) -> None:
    """Fill `result` from the serial output: framed step results, then the kernel log."""
    marker = re.compile(rf"@@{re.escape(token)}:(\S+)(?: (-?\d+))?")
    lines = console.replace("\r", "").split("\n")
    frames: dict[str, tuple[int, list[str]]] = {}
    tag: str | None = None
    status = 0
    body: list[str] = []
    done = False
    for line in lines:
        found = marker.search(line)
        if found is None:
            if tag is not None:
                body.append(line)
            continue
        name, value = found.group(1), found.group(2)
        if name == "END" and tag is not None:
            frames[tag] = (status, body)
            tag = None
        elif name in ("INSMOD", "RMMOD", "DMESG") or name.startswith("CMD"):
            tag, status, body = name, int(value or 0), []
        elif name == "DONE":
            done = True

    def text(frame: str) -> str:
        return "\n".join(frames[frame][1]).strip("\n")

    if "INSMOD" in frames:
        result.loaded = frames["INSMOD"][0] == 0
        if not result.loaded:
            result.insmod_error = text("INSMOD") or f"insmod exited with {frames['INSMOD'][0]}"
    for index, command in enumerate(commands):
        if f"CMD{index}" in frames:
            result.commands.append((command, frames[f"CMD{index}"][0], text(f"CMD{index}")))
    if "RMMOD" in frames:
        result.unloaded = frames["RMMOD"][0] == 0
        if not result.unloaded:
            result.rmmod_error = text("RMMOD") or f"rmmod exited with {frames['RMMOD'][0]}"

    kernel_log = [DMESG_TIMESTAMP.sub("", line) for line in frames.get("DMESG", (0, []))[1]]
    after = [i for i, line in enumerate(kernel_log) if line.endswith(kmsg_marker(token))]
    window = kernel_log[after[0] + 1 :] if after else []
    result.module_log = [line for line in window if line and not BOOT_NOISE.match(line)]
    if not result.loaded:
        result.module_log = _one_attempt(result.module_log)
        # busybox's insmod retries with init_module after finit_module fails: each line twice.
        refusals = [line for line in result.module_log if any(p.search(line) for p in REFUSAL_PATTERNS)]
        result.refusal = "\n".join(dict.fromkeys(refusals)) or None
    # A crash anywhere after boot counts: on the console (the kernel died) or in the log (it lived on).
    booted = next((i for i, line in enumerate(lines) if marker.search(line)), len(lines))
    seen = lines[booted:] if not done else result.module_log
    result.crash = list(dict.fromkeys(line for line in seen if CRASH_PATTERN.search(line)))
    if not done and result.failure is None:
        tail = "\n".join(line for line in lines[-15:] if line.strip())
        result.failure = "the guest stopped before finishing its steps; last console lines:\n" + tail


def _one_attempt(log: list[str]) -> list[str]:
    """The log of a failed insmod, once: busybox's insmod retries with init_module when
    finit_module fails (modutils/modutils.c bb_init_module), so a failing init runs twice and its
    lines end the log twice."""
    for size in range(len(log) // 2, 0, -1):
        if log[-size:] == log[-2 * size:-size]:
            return log[:-size]
    return log


def vmtest(
    module: Path | str,
    kernel: Path | str | None = None,
    arch: str = "x86_64",
    run: Sequence[str] = (),
    timeout: float = 120,
    params: Sequence[str] = (),
    mem: str | None = None,
) -> VmResult:
    """Boot `kernel` (default: Debian's image for the module's vermagic) and load the module in it,
    with module parameters `params` (`NAME=VALUE`, as insmod takes them). `mem`: UML's memory
    size (`mem=`), which decides where its modules land (default: the arch's Vm spec)."""
    return _boot([Load(read_module(Path(module)), run, params)], kernel, arch, timeout, mem)[0]


def vmtest_many(
    modules: Sequence[Path | str],
    kernel: Path | str | None = None,
    arch: str = "x86_64",
    timeout: float = 120,
    mem: str | None = None,
) -> list[VmResult]:
    """One boot for several modules of one kernel: each is loaded and unloaded in turn (a refused
    one leaves the kernel as it was), and gets its own result, in order. A boot costs seconds of
    TCG; a module's insmod and rmmod, milliseconds."""
    if not modules:
        raise RustkoError("vmtest needs at least one module")
    return _boot([Load(read_module(Path(module))) for module in modules], kernel, arch, timeout, mem)


def _uml_command(command: Sequence[str], mem: str) -> tuple[str, ...]:
    """UML's arguments with `mem=` replaced: arch/um/kernel/um_arch.c uml_mem_setup takes
    memparse()'s syntax (a number with an optional K/M/G suffix)."""
    if not re.fullmatch(r"[1-9][0-9]*[KMGkmg]?", mem):
        raise RustkoError(f"--mem {mem!r} is not a memory size", hint="pass e.g. --mem 64M or --mem 3G")
    return tuple(f"mem={mem}" if arg.startswith("mem=") else arg for arg in command)


def _boot(loads: Sequence[Load], kernel: Path | str | None, arch: str, timeout: float,
          mem: str | None = None) -> list[VmResult]:
    spec = resolve_arch(arch)
    boot = spec.vm
    assert boot is not None  # resolve_arch refuses architectures without one
    if mem is not None:
        if not boot.uml:
            raise RustkoError(f"--mem is for UML (--arch um), not {spec.name}",
                              hint="QEMU guests have a fixed memory size; drop --mem")
        boot = boot._replace(command=_uml_command(boot.command, mem))
    for load in loads:
        if load.module.elf_machine != spec.elf_machine_name:
            raise RustkoError(
                f"{load.module.path} is built for {load.module.elf_machine}, not for {spec.name}",
                hint=f"pass the matching --arch ({', '.join(_bootable())})",
            )
    info = loads[0].module
    if kernel is None:
        if not info.release:
            raise RustkoError(
                f"{info.path} has no vermagic, so its kernel is unknown", hint="pass --kernel VMLINUZ"
            )
        others = sorted({load.module.release for load in loads} - {info.release})
        if others:
            raise RustkoError(f"{info.path} was built for kernel {info.release}, other modules for "
                              f"{', '.join(others)}: one boot runs one kernel",
                              hint="run vmtest once per kernel, or pass --kernel VMLINUZ")
        vmlinuz = _uml_kernel(info) if boot.uml else debian_kernel(info.release, spec.name)
    else:
        vmlinuz = Path(kernel).absolute()  # QEMU runs in a temporary folder
        if not vmlinuz.is_file() or not os.access(vmlinuz, os.R_OK):
            raise RustkoError(f"kernel image {vmlinuz} does not exist or is not readable")
    qemu = "" if boot.uml else _require_tool(boot.command[0], boot.package)
    base = base_initramfs(spec)
    tokens = [secrets.token_hex(6) for _ in loads]
    failure = None
    with tempfile.TemporaryDirectory(prefix="rustko-vm-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(base.read_bytes() + run_initramfs(list(zip(tokens, loads))))
        if boot.uml:
            # Without address randomization: UML adds the gap between its binary and its brk to
            # mem= (arch/um/kernel/um_arch.c linux_main, "exec-shield gap"), and module memory
            # starts after both, so a randomized brk (up to 1 GiB on this machine's 6.18 host
            # kernel) would move modules from run to run.
            argv = ["setarch", "--addr-no-randomize", str(vmlinuz), *boot.command, f"initrd={initrd}",
                    *BOOT_PARAMS]
        else:
            argv = [
                qemu,
                *boot.command[1:],
                "-nographic",
                "-no-reboot",
                "-nic",
                "none",
                "-kernel",
                str(boot_image(vmlinuz) if spec.name == "x86_64" else vmlinuz),
                "-initrd",
                str(initrd),
                "-append",
                " ".join([f"console={boot.console}", "panic=-1", *BOOT_PARAMS]),
            ]
        # UML keeps its memory in a file under $TMPDIR and may dump core into its working
        # folder on a panic: both go to the run's own folder. Its helper processes share its
        # process group, so a timeout kills them all.
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=tmp, env={**os.environ, "TMPDIR": tmp}, start_new_session=boot.uml)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if boot.uml:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            output, _ = proc.communicate()
            failure = f"timed out after {timeout:g} s; {'UML' if boot.uml else 'QEMU'} was killed"
        seconds = time.monotonic() - started
    console = output.decode("utf-8", "replace")
    if proc.returncode not in (0, None) and failure is None and "@@" + tokens[0] not in console:
        raise RustkoError(
            f"{vmlinuz if boot.uml else boot.command[0]} failed (exit {proc.returncode}): {console.strip()[-500:]}",
            hint="check the kernel image path and that it is for this architecture",
        )
    results = []
    for token, load in zip(tokens, loads):
        result = VmResult(module=load.module.name, kernel=vmlinuz, arch=spec.name, failure=failure,
                          seconds=seconds, console=console)
        parse_console(console, token, result, load.commands)
        results.append(result)
    return results



# --- command line ------------------------------------------------------------------------------


def report(result: VmResult) -> None:
    """Print what the user needs: the module's log, each command, and the verdict with its reason."""
    print(f"kernel: {result.kernel} ({result.arch}), {result.seconds:.1f} s")
    print(f"kernel log of {result.module}:")
    for line in result.module_log:
        print(f"  {line}")
    for command, status, output in result.commands:
        print(f"$ {command}  (exit {status})")
        for line in output.splitlines():
            print(f"  {line}")
    problems: list[str] = []
    if result.failure:
        problems.append(result.failure)
    if result.crash:
        problems.append("the kernel crashed:\n" + "\n".join(f"  {line}" for line in result.crash))
    if not result.loaded and result.failure is None:
        if result.refusal:
            problems.append(f"the kernel refused {result.module}:\n  " + result.refusal.replace("\n", "\n  "))
        problems.append(f"insmod failed: {result.insmod_error}")
    if result.loaded and not result.unloaded and result.failure is None:
        problems.append(f"rmmod failed: {result.rmmod_error}")
    failed = [command for command, status, _ in result.commands if status != 0]
    if failed:
        problems.append("commands failed: " + ", ".join(failed))
    if result.ok:
        print(f"ok: {result.module} loaded and unloaded cleanly")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)


def _uml_kernel(info: ModuleInfo) -> Path:
    """The packaged UML kernel, when the module was built for its release."""
    from . import uml

    kernel = uml.uml_kernel()
    releases = uml.uml_releases()
    if info.release not in releases:
        raise RustkoError(
            f"{info.path} was built for kernel {info.release}, but the installed UML kernel is "
            f"{', '.join(sorted(releases)) or 'of no known release'}",
            hint="build against KDIR=$(rustko kdir --arch um), or pass --kernel LINUX_UML",
        )
    return kernel


def arch_of(module: Path | str) -> str:
    """The guest architecture a module was built for, so `--arch` is needed only to insist.

    UML modules are x86_64 ELF with no arch word in their vermagic: their release tells them
    apart, when it is the release of the installed UML kernel (`user-mode-linux`).
    """
    from .uml import uml_releases

    info = read_module(Path(module))
    machine = info.elf_machine
    if machine == arches.UM.elf_machine_name and info.release in uml_releases():
        return "um"
    for spec in arches.ALL:
        if spec.vm and not spec.vm.uml and spec.elf_machine_name == machine:
            return spec.name
    raise RustkoError(f"vmtest cannot boot {machine} modules", hint=f"supported: {', '.join(_bootable())}")


def _bootable() -> list[str]:
    return [a.name for a in arches.ALL if a.vm]


def _main(args: argparse.Namespace) -> int:
    arch = args.arch or arch_of(Path(args.modules[0]))
    if len(args.modules) > 1:
        if args.commands or args.params:
            raise RustkoError("--run and --param apply to one MODULE, and several were given",
                              hint="run vmtest once for the module that needs them")
        results = vmtest_many(args.modules, kernel=args.kernel, arch=arch, timeout=args.timeout,
                              mem=args.mem)
    else:
        results = [vmtest(args.modules[0], kernel=args.kernel, arch=arch, run=args.commands,
                          timeout=args.timeout, params=args.params, mem=args.mem)]
    for result in results:
        report(result)
    return 0 if all(result.ok for result in results) else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `rustko vmtest`."""
    parser = subparsers.add_parser(
        "vmtest",
        help="boot the module's kernel in QEMU, insmod and rmmod it, show its log",
        description=(
            "Boot a real kernel in QEMU (TCG) with a busybox initramfs, insmod and rmmod each MODULE "
            "in turn, and print its kernel log. UML modules (--arch um, or built for the release of the "
            "installed user-mode-linux) run in that UML kernel as a process instead. Exit 0: every module loaded and unloaded cleanly (and every --run "
            "command exited 0); 1: refused or failed in the kernel; 2: bad usage or missing tools."
        ),
    )
    parser.add_argument("modules", nargs="+", metavar="MODULE.ko",
                        help="one or more modules of one kernel: one boot loads and unloads each in turn")
    parser.add_argument(
        "--kernel",
        metavar="VMLINUZ",
        help="kernel image to boot (default: Debian's linux-image for the module's vermagic; "
        "for um, /usr/bin/linux.uml)",
    )
    parser.add_argument("--arch", help=f"guest architecture: {', '.join(_bootable())} (default: the module's)")
    parser.add_argument(
        "--run",
        dest="commands",
        action="append",
        default=[],
        metavar="CMD",
        help="a shell command to run in the guest while the module is loaded (repeatable: one per --run)",
    )
    parser.add_argument("--param", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="module parameter for insmod (repeatable)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before QEMU is killed (default 120)")
    parser.add_argument("--mem", metavar="SIZE",
                        help="UML only: the kernel's mem= (default 3G); it decides where modules land")
    parser.set_defaults(run=_main)
