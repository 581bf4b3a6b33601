"""The modules of Debian 12's DKMS packages (main), built by Debian's own DKMS for each kernel.

Each package is built once per (package version, kernel release) in an overlay of the
debootstrapped bookworm root (tests/debroot.py): its dependencies installed by apt, then
`dkms build -m NAME -v VERSION -k RELEASE`, exactly what a user's machine runs. The host is never
changed. The built `.ko` files (or the log of a build that failed, or DKMS's "skipped" for a
BUILD_EXCLUSIVE package) are kept under /var/tmp/rustko-dkms-corpus, outside any clone:

    CORPUS/<release>/<package>_<version>/{*.ko, order} or {FAILED, SKIPPED}

`order` lists the modules in the order modprobe would load them (a sibling the module depends on
first: the `depends=` modpost writes into `.modinfo`).

Run as a script to build (and time) a set of packages: `python tests/dkmscorpus.py [PACKAGE...]`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import debroot

CORPUS = Path(os.environ.get("RUSTKO_DKMS_CORPUS", "/var/tmp/rustko-dkms-corpus"))
# The kernels whose headers the base root holds (installed, or downloaded for later).
RELEASES = tuple(p.removeprefix("linux-headers-") for p in debroot.BASE_PACKAGES + debroot.LATER_PACKAGES
                 if p.startswith("linux-headers-"))
# Debian 12's DKMS packages (main) that DKMS builds, the ones tests/test_check_dkms.py checks. For
# 6.1 every one that builds, except for a cold machine's time openvpn-dco (builds: 3 minutes for
# one module) and the large sources never tried here (jool, lttng-modules, openafs,
# falcosecurity-scap). Cold (2026-11-26, the 2-core machine kind, shared, load 3-6; base root
# already made), both lists: 14 minutes, dahdi's 32 modules alone 4 (10 at load 11).
# librem-ec-acpi and openrazer-driver do not build for 6.1. They cover
# modules that need a sibling's exports (dahdi, xtables-addons' compat_xtables, ddcci,
# nat-rtsp, rapiddisk, tp-smapi), a module that needs a symbol nothing exports
# (dahdi_echocan_oslec: `oslec_*` come from the staging `echo` driver, which Debian's 6.1 does not
# build), inits that fail without their device or feature. For 6.12 only those that still build
# there: bookworm's DKMS sources predate it and most fail to compile.
CHOSEN: dict[str, list[str]] = {
    "6.1.0-56-amd64": ["dahdi-dkms", "ddcci-dkms", "gost-crypto-dkms", "nat-rtsp-dkms", "rapiddisk-dkms",
                       "tp-smapi-dkms", "xtables-addons-dkms", "acpi-call-dkms", "adv-17v35x-dkms", "apfs-dkms",
                       "bbswitch-dkms", "digimend-dkms", "dm-writeboost-dkms", "dpdk-kmods-dkms", "evdi-dkms",
                       "iptables-netflow-dkms", "langford-dkms", "lime-forensics-dkms", "rtpengine-kernel-dkms",
                       "v4l2loopback-dkms", "vpoll-dkms", "west-chamber-dkms", "xtrx-dkms"],
    "6.12.117+deb12-amd64": ["acpi-call-dkms", "bbswitch-dkms", "dpdk-kmods-dkms", "lime-forensics-dkms",
                             "rtpengine-kernel-dkms", "west-chamber-dkms"],
}

# dkms build's exit status for a package whose BUILD_EXCLUSIVE_* excludes the kernel (dkms 3.0.10).
DKMS_SKIPPED = 77


def download(packages: list[str]) -> dict[str, Path]:
    """Each package's .deb as the host's apt knows it (nothing installed), by package name."""
    folder = CORPUS / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    # One apt-cache for all: each call reads apt's whole cache (seconds on this machine kind).
    policy = subprocess.run(["apt-cache", "policy", *packages], capture_output=True, text=True, check=True).stdout
    candidates = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", policy, re.M))
    wanted: dict[str, str] = {}
    for package in packages:
        if candidates.get(package, "(none)") == "(none)":
            raise RuntimeError(f"apt knows no candidate for {package}")
        wanted[package] = candidates[package]

    def deb(package: str) -> Path | None:
        # apt-get download names the file NAME_VERSION_ARCH.deb with the epoch's ':' as %3a.
        return next(iter(folder.glob(f"{package}_{wanted[package].replace(':', '%3a')}_*.deb")), None)

    missing = [f"{package}={version}" for package, version in wanted.items() if deb(package) is None]
    if missing:
        subprocess.run(["apt-get", "download", "-q", *missing], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL)
    debs = {package: deb(package) for package in packages}
    return debs


def _dkms_name(deb: Path) -> tuple[str, str]:
    """The DKMS module name and version the package's dkms.conf declares (its /usr/src folder)."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        found = re.search(r"\./usr/src/([^/]+)/dkms\.conf$", line)
        if found:
            folder = found.group(1)
            conf = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
            text = _member(conf, f"./usr/src/{folder}/dkms.conf")
            name = re.search(r'^\s*PACKAGE_NAME=["\']?([^"\'\s]+)', text, re.M)
            version = re.search(r'^\s*PACKAGE_VERSION=["\']?([^"\'\s]+)', text, re.M)
            if name and version and "$" not in name.group(1) + version.group(1):
                return name.group(1), version.group(1)
            # dkms.conf files that compute them (#MODULE_VERSION#): the folder is NAME-VERSION.
            return folder.split("-", 1)[0], folder.split("-", 1)[1]
    raise RuntimeError(f"{deb} holds no /usr/src/*/dkms.conf")


def _member(tar: bytes, name: str) -> str:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        handle = archive.extractfile(name)
        assert handle is not None
        return handle.read().decode("utf-8", "replace")


def entry(release: str, deb: Path) -> Path:
    """The corpus folder of one package's modules for one kernel."""
    return CORPUS / release / deb.name.rsplit("_", 1)[0]


def load_order(folder: Path) -> list[str]:
    """Module names in modprobe's order: each after the siblings its `depends=` names."""
    depends: dict[str, list[str]] = {}
    for ko in sorted(folder.glob("*.ko")):
        info = _modinfo(ko)
        depends[ko.stem] = [d for d in info.get("depends", "").split(",") if d]
    names = {name.replace("-", "_"): name for name in depends}
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        if name in order or name in stack:
            return
        for dep in depends[name]:
            if dep.replace("-", "_") in names:
                visit(names[dep.replace("-", "_")], stack + (name,))
        order.append(name)

    for name in depends:
        visit(name)
    return order


def _modinfo(ko: Path) -> dict[str, str]:
    """`.modinfo` as a dict; a key given more than once (alias) holds its values joined by ","."""
    from rustko.elf import Elf

    elf = Elf(ko.read_bytes(), str(ko))
    info: dict[str, str] = {}
    for item in elf.section_bytes(elf.find(".modinfo")).split(b"\0"):
        key, _, value = item.decode("utf-8", "replace").partition("=")
        info[key] = f"{info[key]},{value}" if key in info else value
    return info


def build(packages: list[str], releases: tuple[str, ...] = RELEASES, log=print) -> dict[str, dict[str, Path]]:
    """{release: {package: corpus folder}} for `packages`, building what the cache lacks."""
    debs = download(packages)
    todo = {(release, package) for release in releases for package in packages
            if not entry(release, debs[package]).is_dir()}
    if todo:
        _build_in_root(sorted({p for _, p in todo}), debs, todo, log)
    return {release: {package: entry(release, debs[package]) for package in packages} for release in releases}


def _build_in_root(packages: list[str], debs: dict[str, Path], todo: set[tuple[str, str]], log) -> None:
    root = debroot.overlay_root(f"dkmscorpus-{os.getpid()}")
    try:
        started = time.monotonic()
        # No build while installing: DKMS's postinst and kernel hooks honour this file
        # (/usr/lib/dkms/common.postinst); each build below is asked for explicitly.
        (root / "etc/dkms").mkdir(parents=True, exist_ok=True)
        (root / "etc/dkms/no-autoinstall").touch()
        debroot.must(root, "apt-get", "update", "-q")
        inside = root / "tmp/debs"
        inside.mkdir(parents=True)
        for package in packages:
            shutil.copy(debs[package], inside)
        debroot.must(root, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                      *debroot.LATER_PACKAGES, *(f"/tmp/debs/{debs[p].name}" for p in packages), timeout=1800)
        log(f"installed {len(packages)} packages and their dependencies: {time.monotonic() - started:.0f} s")
        for package in packages:
            name, version = _dkms_name(debs[package])
            for release in RELEASES:
                if (release, package) not in todo:
                    continue
                started = time.monotonic()
                proc = debroot.run(root, "dkms", "build", "-m", name, "-v", version, "-k", release, timeout=1800)
                target = entry(release, debs[package])
                tmp = target.with_name(target.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                built = root / "var/lib/dkms" / name / version / release / "x86_64" / "module"
                if proc.returncode == DKMS_SKIPPED:
                    (tmp / "SKIPPED").write_text(proc.stdout)
                elif proc.returncode != 0 or not any(built.glob("*.ko*")):
                    logfile = root / "var/lib/dkms" / name / version / "build" / "make.log"
                    (tmp / "FAILED").write_text(proc.stdout + (logfile.read_text(errors="replace")[-6000:]
                                                               if logfile.is_file() else ""))
                else:
                    for ko in built.glob("*.ko*"):
                        shutil.copy(_plain(ko), tmp / f"{ko.name.split('.ko')[0]}.ko")
                    (tmp / "order").write_text("\n".join(load_order(tmp)) + "\n")
                state = "built" if (tmp / "order").exists() else "skipped" if (tmp / "SKIPPED").exists() else "FAILED"
                log(f"{package} for {release}: {state} in {time.monotonic() - started:.0f} s")
                os.rename(tmp, target)
    finally:
        debroot.close_root(root)


# --- what the real kernel says -----------------------------------------------------------------

# init/main.c initcall_debug_enable (6.1, 6.12): registers the probes that log "calling  FN @ PID"
# before each initcall, a module's init included; only at boot (writing the sysfs parameter later
# registers nothing). KERN_DEBUG: in the log, not on the console.
INITCALL_DEBUG = "initcall_debug"

# Sizes of a guest that holds every module of the corpus at once (vm.ARCHES' 512 MiB is for one).
GUEST_MEMORY = "2048"


@dataclass
class Load:
    """One module's insmod in the guest: its exit status, what insmod printed, the kernel's lines
    while it ran, and whether the module's init function was called (the loader let it through)."""

    package: str
    module: str
    status: int
    insmod: str
    kernel: list[str]

    @property
    def init_called(self) -> bool:
        # init/main.c do_one_initcall_debug (6.1, 6.12): "calling  FN @ PID" before a module's init.
        return any(line.startswith("calling  ") and f"[{self.module.replace('-', '_')}]" in line
                   for line in self.kernel)

    @property
    def verdict(self) -> str:
        """"loaded", "init-failed" (the loader accepted it, its init returned an error: a device
        that is not there) or "refused" (the loader said no)."""
        if self.status == 0:
            return "loaded"
        return "init-failed" if self.init_called else "refused"


def _kernel_deps(release: str, modules: list[Path]) -> list[Path]:
    """The in-tree modules the corpus needs, closure of `depends=`, in load order (decompressed
    copies: busybox's insmod takes plain ELF)."""
    from rustko.vm import debian_modules

    tree = debian_modules(release)
    by_name = {p.name.split(".ko")[0].replace("-", "_"): p for p in tree.rglob("*.ko*")}
    own = {m.stem.replace("-", "_") for m in modules}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")  # `depends=` keeps a file name's dashes (usb-common)
        if name in seen or name in own:
            return
        if name not in by_name:
            name = _by_alias(name, by_name)
            if name in seen or not name:
                return
        seen.add(name)
        path = _plain(by_name[name])
        info = _modinfo(path)
        # modprobe loads a `softdep=pre:` module first (libcrc32c's crc32c: without it its init
        # fails, and nf_conntrack with it).
        pre = info.get("softdep", "").partition("pre:")[2].partition("post:")[0].split()
        for dep in info.get("depends", "").split(",") + pre:
            if dep:
                visit(dep)
        order.append(path)

    for module in modules:
        for dep in _modinfo(module).get("depends", "").split(","):
            if dep:
                visit(dep)
    return order


def _by_alias(alias: str, by_name: dict[str, Path]) -> str:
    """The module that declares `alias` (a softdep names a crypto algorithm: crc32c is
    crc32c_generic's alias), searched among the modules named after it, generic ones first."""
    for name in sorted((n for n in by_name if alias in n), key=lambda n: (not n.endswith("_generic"), n)):
        if alias in _modinfo(_plain(by_name[name])).get("alias", "").split(","):
            return name
    return ""


def _plain(path: Path) -> Path:
    """An uncompressed copy of a compressed module (cached beside the corpus, by its path)."""
    if path.suffix == ".ko":
        return path
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    target = CORPUS / "plain" / key / f"{path.name.split('.ko')[0]}.ko"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tool = {".xz": "xz", ".zst": "zstd", ".gz": "gzip"}[path.suffix]
        with open(str(target) + ".tmp", "wb") as out:
            subprocess.run([tool, "-dc", str(path)], stdout=out, check=True)
        os.rename(str(target) + ".tmp", target)
    return target


# The package name of the kernel's own modules in the guest's results.
KERNEL = "(kernel)"


def guest_script(token: str, packages: dict[str, list[str]], deps: list[str]) -> str:
    """/init: the kernel's own modules the corpus needs (package KERNEL), then each package's
    modules in modprobe's order, each insmod framed with the kernel's lines since the previous one. Nothing is removed
    between packages: an exit function that crashes (xtables-addons' do, after xt_DNETMAP's
    failed init) would spoil the verdicts after it."""
    from rustko.vm import GUEST_PREAMBLE

    lines = [
        *GUEST_PREAMBLE,
        "dmesg -n 1",  # the kernel's own console output would interleave with the frames
        "dmesg -c >/dev/null",
    ]
    steps = [(KERNEL, f"/k/{dep}", dep.removesuffix(".ko")) for dep in deps]
    steps += [(package, f"/d/{package}/{module}.ko", module) for package, modules in packages.items() for module in modules]
    for package, path, module in steps:
        lines += [f"insmod {path} >/tmp/out 2>&1; rc=$?",
                  f"echo '@@{token}:LOAD {package} {module}' $rc", "cat /tmp/out",
                  f"echo '@@{token}:KERNEL'", "dmesg -c", f"echo '@@{token}:END'"]
    lines += ["dmesg -c >/dev/null", f"echo '@@{token}:DONE'", "poweroff -f"]
    return "\n".join(lines) + "\n"


def kernel_verdicts(release: str, folders: dict[str, Path], timeout: float = 900) -> list[Load]:
    """Boot Debian's `release` once under QEMU and insmod every built module of `folders`, package
    by package; each module's verdict comes from that real kernel."""
    import secrets
    import tempfile

    from rustko.vm import BOOT_PARAMS, Cpio, base_initramfs, debian_kernel, resolve_arch

    built = {package: folder for package, folder in folders.items() if (folder / "order").is_file()}
    packages = {package: (folder / "order").read_text().split() for package, folder in built.items()}
    modules = [folder / f"{m}.ko" for package, folder in built.items() for m in packages[package]]
    deps = _kernel_deps(release, modules)
    token = secrets.token_hex(6)
    archive = Cpio()
    archive.directory("k")
    archive.directory("d")
    for dep in deps:
        archive.file(f"k/{dep.name}", dep.read_bytes())
    for package, folder in built.items():
        archive.directory(f"d/{package}")
        for module in packages[package]:
            archive.file(f"d/{package}/{module}.ko", (folder / f"{module}.ko").read_bytes())
    archive.file("init", guest_script(token, packages, [d.name for d in deps]).encode(), 0o755)
    spec = resolve_arch("x86_64")
    assert spec.vm is not None
    command = list(spec.vm.command)
    command[command.index("-m") + 1] = GUEST_MEMORY
    with tempfile.TemporaryDirectory(prefix="rustko-dkms-") as tmp:
        initrd = Path(tmp) / "initrd.gz"
        initrd.write_bytes(base_initramfs(spec).read_bytes() + archive.gzipped())
        proc = subprocess.run([*command, "-nographic", "-no-reboot", "-nic", "none",
                               "-kernel", str(debian_kernel(release)), "-initrd", str(initrd),
                               "-append", " ".join([f"console={spec.vm.console}", "panic=-1", *BOOT_PARAMS,
                                                     INITCALL_DEBUG])],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    console = proc.stdout.decode("utf-8", "replace").replace("\r", "")
    if f"@@{token}:DONE" not in console:
        raise RuntimeError(f"the {release} guest stopped early:\n{console[-3000:]}")
    return parse(console, token)


def parse(console: str, token: str) -> list[Load]:
    """The framed results of `guest_script` (kernel lines without their timestamps)."""
    loads: list[Load] = []
    pattern = re.compile(rf"@@{token}:LOAD (\S+) (\S+) (\d+)\n(.*?)@@{token}:KERNEL\n(.*?)@@{token}:END", re.S)
    for found in pattern.finditer(console):
        kernel = [re.sub(r"^\[\s*\d+\.\d+\]\s?", "", line) for line in found.group(5).splitlines() if line.strip()]
        loads.append(Load(found.group(1), found.group(2), int(found.group(3)), found.group(4).strip(), kernel))
    return loads



if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "site_scons"))
    chosen = sys.argv[1:] or sorted(p.name.split("_")[0] for p in (CORPUS / "debs").glob("*.deb"))
    began = time.monotonic()
    corpus = build(chosen)
    for release, folders in corpus.items():
        for package, folder in folders.items():
            print(release, package, " ".join((folder / "order").read_text().split()) if (folder / "order").exists()
                  else "FAILED" if (folder / "FAILED").exists() else "skipped")
    print(f"total {time.monotonic() - began:.0f} s")
