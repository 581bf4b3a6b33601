"""Reproducible builds: the record a rebuild needs, the rebuild itself, and the byte comparison.

Every build writes `NAME.ko.buildinfo` (JSON) beside `NAME.ko`: the sources' hashes, the module's
metadata and flags, the compiler with its library sources' hash, the Debian packages that made the
bytes (dpkg-query), and the SHA-256 of the unsigned module. `rustko repro rebuild RECORD` builds
the module again from that record and the sources alone; `rustko repro compare A.ko B.ko` compares
two modules byte for byte, ignoring appended signatures (signing stays outside reproducibility,
as with the kernel's own `modules_sign`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import __version__, cache, targetspec
from .errors import RustkoError

if TYPE_CHECKING:  # argparse only for `rustko rebuild/compare`: not imported by every `scons`
    import argparse

RECORD_FORMAT = 1
RECORD_SUFFIX = ".buildinfo"
DPKG_STATUS = "/var/lib/dpkg/status"

# include/linux/module_signature.h (MODULE_SIG_STRING) and scripts/sign-file.c: a signed module is
# the module, then the PKCS#7 signature, then a 12-byte `struct module_signature` whose last field
# is the signature's big-endian length, then this marker.
SIGNATURE_MAGIC = b"~Module signature appended~\n"
SIGNATURE_INFO_SIZE = 12   # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len


def record_path(ko: Path) -> Path:
    return ko.with_name(ko.name + RECORD_SUFFIX)


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature, as the kernel's `mod_verify_sig` sees it."""
    if not data.endswith(SIGNATURE_MAGIC):
        return data
    end = len(data) - len(SIGNATURE_MAGIC)
    if end < SIGNATURE_INFO_SIZE:
        return data
    sig_len = int.from_bytes(data[end - 4:end], "big")
    start = end - SIGNATURE_INFO_SIZE - sig_len
    return data[:start] if start >= 0 else data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_hash(lib_src: Path) -> str:
    """Content hash of the library sources rustko compiles (core, alloc): names and bytes."""
    from .sysroot import library_files

    digest = hashlib.sha256()
    for path in library_files(lib_src):
        digest.update(os.path.relpath(path, lib_src).encode() + b"\0")
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _library_hash_once(target: Any) -> str:
    """`library_hash`, kept beside the sysroot's key (which already covers rustc and the sources'
    names and sizes): reading every source costs a fifth of a second, too much for each build."""
    memo = cache.cache_root() / "buildinfo" / f"library-{target.sysroot_key}"
    if memo.is_file():
        return memo.read_text().strip()
    digest = library_hash(target.toolchain.lib_src)
    cache.store(memo, f"{digest}\n".encode())
    return digest


def _support_hash() -> str:
    """rustko's own Rust and C parts, which reach every module."""
    from .kbuild import RUNTIME_DIR
    from .sysroot import RUST_DIR

    digest = hashlib.sha256()
    for folder in (RUST_DIR, RUNTIME_DIR):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".rs", ".c", ".h")):
            digest.update(path.relative_to(folder.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def packages(paths: Sequence[Path]) -> dict[str, str]:
    """The Debian packages owning `paths` (symlinks followed), with their installed versions.
    Kept in the cache until dpkg's database changes: asking dpkg costs a few tenths of a second."""
    if shutil.which("dpkg-query") is None:
        return {}
    queries = sorted({str(p) for p in paths} | {os.path.realpath(p) for p in paths})
    try:
        stamp = os.stat(DPKG_STATUS).st_mtime_ns
    except OSError:
        stamp = 0
    memo = cache.cache_root() / "buildinfo" / (_sha256("\0".join([str(stamp), *queries]).encode())[:24] + ".json")
    if memo.is_file():
        return json.loads(memo.read_text())
    found = subprocess.run(["dpkg-query", "-S", *queries], capture_output=True, text=True)
    names: set[str] = set()
    for line in found.stdout.splitlines():
        owners, _, _ = line.partition(": ")
        if owners and not owners.startswith("diversion"):
            names.update(owner.strip() for owner in owners.split(","))
    if not names:
        return {}
    listed = subprocess.run(["dpkg-query", "-W", "-f", "${binary:Package}\t${Version}\n", *sorted(names)],
                            capture_output=True, text=True)
    versions = dict(sorted(line.split("\t", 1) for line in listed.stdout.splitlines() if "\t" in line))
    cache.store(memo, json.dumps(versions).encode())
    return versions


def _tool_paths(target: Any) -> list[Path]:
    """What made the bytes, as files dpkg knows: rustc, its sources, the headers, Kbuild's tools."""
    kdir = target.kernel.kdir
    paths = [target.toolchain.rustc, target.toolchain.lib_src / "core/src/lib.rs", kdir, kdir / "Makefile",
             kdir / "scripts" / "mod" / "modpost"]
    makefile = kdir / "Makefile"
    if makefile.is_file():   # Debian's headers: `include /usr/src/linux-headers-X-common/Makefile`
        for line in makefile.read_text(errors="replace").splitlines():
            if line.startswith("include "):
                paths.append(Path(line.split(None, 1)[1].strip()))
    cross = target.linker.removesuffix("ld")   # the CROSS_COMPILE prefix the build used, default included
    tools = ("clang", "ld.lld") if target.options.llvm else (f"{cross}gcc", target.linker)
    paths += [Path(found) for found in map(shutil.which, (*tools, "make")) if found]
    return [p for p in paths if os.path.lexists(p)]


def _relative(path: Path, project_dir: Path) -> str:
    try:
        return path.resolve().relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _inputs(dep_file: Path, project_dir: Path, deps: Sequence[Any], work: Path) -> list[Path]:
    """The Rust sources rustc read (its dep-info), the module's and each path dependency's."""
    from .build import dep_files

    found = dep_files(dep_file, project_dir)
    todo = list(deps)
    while todo:
        dep = todo.pop()
        found += [*dep_files(work / "deps" / f"{dep.crate}.d", dep.folder), dep.folder / "Cargo.toml"]
        todo += dep.deps
    return found


def make_record(target: Any, spec: Any, ko: Path) -> dict[str, Any]:
    """Everything a rebuild needs, and nothing that differs between two builds of the same bytes
    (no project path, user, host name or time). `spec`: the build's `build.ModuleSpec`."""
    project_dir, c_sources = spec.project_dir, spec.c_sources
    inputs = _inputs(spec.dep_file, project_dir, spec.deps, spec.work)
    files = sorted({*inputs, *c_sources, project_dir / "Cargo.toml"})
    options = dataclasses.asdict(target.options)
    options.pop("verbose")
    # What this build resolved, so that a rebuild elsewhere does not pick another kernel or rustc.
    options.update(kdir=str(target.kernel.kdir), rustc=str(target.toolchain.rustc))
    options.pop("sign_key")     # signing is outside reproducibility (strip_signature)
    options.pop("sign_cert")
    return {
        "rustko_buildinfo": RECORD_FORMAT,
        "rustko": {"version": __version__, "support_sha256": _support_hash()},
        "module": {
            "name": spec.name, "source": _relative(spec.source, project_dir), "edition": spec.edition,
            "rustflags": list(spec.rustflags), "ccflags": list(spec.ccflags),
            "extra_symbols": [_relative(p, project_dir) for p in spec.extra_symbols],
            "c_sources": [_relative(p, project_dir) for p in c_sources],
            "info": dataclasses.asdict(spec.info),
            "sha256": _sha256(strip_signature(ko.read_bytes())),
        },
        "sources": {_relative(p, project_dir): _sha256(p.read_bytes()) for p in files if p.is_file()},
        "kernel": {"kdir": str(target.kernel.kdir), "release": target.kernel.release, "arch": target.kernel.arch},
        "options": options,
        "rustc": {"path": str(target.toolchain.rustc), "version": target.toolchain.version,
                  "verbose_version": target.toolchain.verbose_version, "library": str(target.toolchain.lib_src),
                  "library_sha256": _library_hash_once(target)},
        "flags": targetspec.portable(target.flags),
        "packages": packages(_tool_paths(target)),
    }


def write_record(record: dict[str, Any], ko: Path) -> Path:
    path = record_path(ko)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise RustkoError(f"cannot read {path}: {err.strerror}",
                          f"a build writes build/NAME.ko{RECORD_SUFFIX} beside the module") from None
    except ValueError as err:
        raise RustkoError(f"{path} is not a rustko build record: {err}") from None
    if not isinstance(record, dict) or record.get("rustko_buildinfo") != RECORD_FORMAT:
        raise RustkoError(f"{path} is not a rustko build record (format {RECORD_FORMAT})",
                          f"pass the NAME.ko{RECORD_SUFFIX} file a build wrote beside the module")
    return record


def _differences(record: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What in this machine's toolchain differs from the recorded one."""
    lines = []
    for key, label in (("version", "rustko version"), ("support_sha256", "rustko's Rust/C support code")):
        if record["rustko"][key] != now["rustko"][key]:
            lines.append(f"{label}: recorded {record['rustko'][key]}, here {now['rustko'][key]}")
    for key in ("verbose_version", "library_sha256"):
        if record["rustc"][key] != now["rustc"][key]:
            lines.append(f"rustc {key}: recorded {record['rustc'][key]!r}, here {now['rustc'][key]!r}")
    if record["flags"] != now["flags"]:
        lines.append(f"flags: recorded {' '.join(record['flags'])}, here {' '.join(now['flags'])}")
    for name, version in sorted(record["packages"].items()):
        here = now["packages"].get(name)
        if here != version:
            lines.append(f"package {name}: recorded {version}, here {here or 'not installed'}")
    return lines


def rebuild(record_file: Path, source_dir: Path, out_dir: Path,
            log: Callable[[str], None] = print) -> tuple[Path, bool, list[str]]:
    """Build the recorded module again from `source_dir`; returns (new .ko, same bytes?, toolchain
    differences). Sources that differ from the record are an error: they cannot give its bytes."""
    from . import build, kbuild, project

    record = read_record(record_file)
    module = record["module"]
    changed = [name for name, digest in sorted(record["sources"].items())
               if not (source_dir / name).is_file() or _sha256((source_dir / name).read_bytes()) != digest]
    if changed:
        raise RustkoError(f"{source_dir} does not hold the recorded sources: {', '.join(changed)} "
                          "missing or different", "check out the revision the module was built from", exit_code=1)
    known = {f.name for f in dataclasses.fields(build.Options)}
    target = build.resolve(build.Options(**{k: v for k, v in record["options"].items() if k in known}))
    info_fields = dict(module["info"])
    info = kbuild.ModuleInfo(**{**info_fields, "params": tuple(kbuild.Param(**p) for p in info_fields["params"])})
    manifest = project.read_manifest(source_dir / "Cargo.toml")
    out_dir.mkdir(parents=True, exist_ok=True)
    ko = out_dir / f"{module['name']}.ko"
    log(f"  REBUILD {module['name']}.ko from {record_file}")
    spec = build.ModuleSpec(info=info, source=source_dir / module["source"], project_dir=source_dir,
                            work=out_dir / ".rustko" / module["name"], edition=module["edition"],
                            rustflags=tuple(module["rustflags"]), ccflags=tuple(module["ccflags"]),
                            extra_symbols=tuple(source_dir / p for p in module["extra_symbols"]),
                            c_sources=tuple(source_dir / p for p in module["c_sources"]),
                            deps=project.path_dependencies(manifest, source_dir))
    build.build_module(target, spec, ko, lambda line: None)
    now = read_record(record_path(ko))
    same = _sha256(strip_signature(ko.read_bytes())) == module["sha256"]
    return ko, same, _differences(record, now)


def compare(first: Path, second: Path) -> list[str]:
    """Where two modules differ (empty: the same bytes), signatures stripped."""
    data = []
    for path in (first, second):
        try:
            data.append(strip_signature(path.read_bytes()))
        except OSError as err:
            raise RustkoError(f"cannot read {path}: {err.strerror}") from None
    a, b = data
    if a == b:
        return []
    lines = [f"{first} ({len(a)} bytes) and {second} ({len(b)} bytes) differ"]
    lines += _section_differences(a, b)
    return lines


def _section_differences(a: bytes, b: bytes) -> list[str]:
    """The ELF sections whose contents differ, so the cause can be looked for (debug info: a path)."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        sections = [{s.name: s.data() if s.header.sh_type != "SHT_NOBITS" else b""
                     for s in ELFFile(io.BytesIO(blob)).iter_sections()} for blob in (a, b)]
    except ELFError:
        return ["  (not ELF files: no section comparison)"]
    names = sorted(set(sections[0]) | set(sections[1]))
    return [f"  section {name} differs" for name in names if sections[0].get(name) != sections[1].get(name)]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    import argparse

    parser = subparsers.add_parser("repro", help="rebuild a module from its build record; compare modules",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="repro_command", metavar="ACTION")
    sub.required = True
    again = sub.add_parser("rebuild", help="build a module again from NAME.ko.buildinfo and its sources; "
                           "exit 0 when the bytes are the recorded ones")
    again.add_argument("record", type=Path, help="the NAME.ko.buildinfo a build wrote")
    again.add_argument("--source", type=Path, default=Path("."), help="the project's sources (default: .)")
    again.add_argument("--out", type=Path, default=Path("rebuild"), help="where the rebuilt module goes "
                       "(default: ./rebuild)")
    again.set_defaults(run=_run_rebuild)
    same = sub.add_parser("compare", help="compare two .ko files byte for byte, appended signatures "
                          "stripped; exit 0 when identical")
    same.add_argument("first", type=Path)
    same.add_argument("second", type=Path)
    same.set_defaults(run=_run_compare)


def _run_rebuild(args: argparse.Namespace) -> int:
    ko, same, differences = rebuild(args.record, args.source.resolve(), args.out.resolve())
    for line in differences:
        print(f"warning: {line}", file=sys.stderr)
    if same:
        print(f"ok: {ko} is byte for byte the recorded module")
        return 0
    print(f"error: {ko} differs from the recorded module", file=sys.stderr)
    if differences:
        print("  help: install the recorded package versions (warnings above) and rebuild", file=sys.stderr)
    return 1


def _run_compare(args: argparse.Namespace) -> int:
    lines = compare(args.first, args.second)
    if not lines:
        print(f"ok: {args.first} and {args.second} are the same module (signatures ignored)")
        return 0
    print("\n".join(lines))
    return 1
