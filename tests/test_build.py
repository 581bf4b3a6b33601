"""The build path end to end: real rustc, real Debian headers, real Kbuild, real kernels in QEMU."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import KDIRS, copy_example, require_kdir, rustko, scons, snapshot, tool
from rustko import build, kbuild, vm
from rustko.kernel import probe


def build_ok(project: Path, kdir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = scons(project, f"KDIR={kdir}", *args, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_hello_loads_in_the_real_kernel(tmp_path: Path, kdir: Path) -> None:
    """`scons vmtest` builds, checks, then boots Debian's kernel for these headers and loads it."""
    project = copy_example(tmp_path / "hello")
    output = build_ok(project, kdir, "vmtest")
    for line in ("  RUSTC   hello", "  KBUILD  hello.ko", "  CHECK   hello.ko", "  VMTEST  hello.ko",
                 "hello: hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 41", "hello: goodbye from Rust",
                 "ok: hello loaded and unloaded cleanly"):
        assert line in output, output
    assert "vmtest" not in build_ok(project, kdir).lower(), "booting is opt-in"


def test_pic_module_fails_the_check_and_the_kernel_agrees(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "pic")
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'env.RustKernelModule("pic", "src/lib.rs", rustflags=["-Crelocation-model=pic", "-Zplt=no"])\n')
    result = scons(project, f"KDIR={kdir61}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "R_X86_64_GOTPCREL (9)" in output
    assert "module: pic: Unknown rela relocation: 9" in output
    assert "-Crelocation-model=static" in output
    assert "Traceback" not in output
    assert not (project / "build" / "pic.ko").exists(), "a refused module is not published"
    booted = vm.vmtest(project / "build" / ".rustko" / "pic" / "pic.ko")
    assert not booted.loaded
    assert booted.refusal is not None and "module: pic: Unknown rela relocation: 9" in booted.refusal


def test_same_module_from_two_paths_is_byte_identical(tmp_path: Path, kdir61: Path) -> None:
    first = copy_example(tmp_path / "a" / "hello")
    second = copy_example(tmp_path / "somewhere" / "much" / "deeper" / "hello")
    build_ok(first, kdir61)
    build_ok(second, kdir61)
    assert (first / "build/hello.ko").read_bytes() == (second / "build/hello.ko").read_bytes()


def test_build_writes_nothing_outside_build_and_clean_removes_it(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    kernel_trees = [kdir61, kdir61.resolve().parent / kdir61.name.replace("-amd64", "-common")]
    before_kdir = {str(tree): snapshot(tree) for tree in kernel_trees if tree.is_dir()}
    before = snapshot(project)
    build_ok(project, kdir61)
    after_build = snapshot(project)
    assert {k: v for k, v in after_build.items() if not k.startswith("build/")} == before
    assert {str(tree): snapshot(Path(tree)) for tree in before_kdir} == before_kdir
    result = scons(project, "-c", f"KDIR={kdir61}")
    assert result.returncode == 0, result.stderr
    assert snapshot(project) == before


def test_editing_a_submodule_rebuilds_and_noop_builds_nothing(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    build_ok(project, kdir61)
    assert build_ok(project, kdir61).strip() == "scons: `.' is up to date."
    log_rs = project / "src" / "log.rs"
    log_rs.write_text(log_rs.read_text().replace("const INFO: i32 = 6;", "const INFO: i32 = 5;"))
    output = build_ok(project, kdir61)
    assert "  RUSTC   hello" in output and "  KBUILD  hello.ko" in output
    assert build_ok(project, kdir61).strip() == "scons: `.' is up to date."


def test_rust_files_are_walked_once_per_spec(tmp_path: Path) -> None:
    """One `scons` run makes a module's spec while reading the SConstruct, and its early Kbuild
    start, plan and build step share one walk of the Rust files (and one read of the sysroot
    crates they name); the next run's spec sees a new file, what it names, and a deleted file."""
    project = copy_example(tmp_path / "hello")
    spec = build.ModuleSpec(info=kbuild.ModuleInfo(name="hello"), source=project / "src/lib.rs",
                            project_dir=project, work=tmp_path / "work")
    walked = spec.rust_files
    assert walked == (project / "src/lib.rs", project / "src/log.rs") and "alloc" not in spec.crates
    extra = project / "src/extra.rs"
    extra.write_text("extern crate alloc;\n")
    assert spec.rust_files is walked and "alloc" not in spec.crates  # the same run: not walked again
    with_headers = spec.with_c_sources([project / "src/glue.h"])
    assert with_headers.c_sources == (project / "src/glue.h",) and with_headers.rust_files is walked

    next_run = dataclasses.replace(spec)
    assert extra in next_run.rust_files and "alloc" in next_run.crates
    (project / "src/log.rs").unlink()
    assert dataclasses.replace(spec).rust_files == (extra, project / "src/lib.rs")


def test_project_path_with_spaces_builds(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "my modules" / "hello world")
    build_ok(project, kdir61)
    assert (project / "build" / "hello.ko").is_file()


def test_sysroot_cache_is_shared_atomic_and_survives_interruption(tmp_path: Path, kdir61: Path) -> None:
    """A fresh cache: an interrupted first build leaves no entry; then two projects built at once
    (each with -j2) share one sysroot; a third project builds without compiling core again."""
    cache = tmp_path / "cache"
    env = {"RUSTKO_CACHE": str(cache)}
    projects = [copy_example(tmp_path / name) for name in ("one", "two", "three")]

    def interrupt(sig: int) -> None:
        """Start a build in its own process group and hit it (like Ctrl-C, or a kill -9)
        while core is being compiled."""
        proc = subprocess.Popen([tool("scons"), "-Q", f"KDIR={kdir61}"], cwd=projects[0],
                                env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list((cache / "sysroot").glob(".*.*/lib/rustlib/*/lib/*")):
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert [p.name for p in (cache / "sysroot").iterdir() if not p.name.startswith(".")
                and not p.name.endswith(".lock")] == []

    interrupt(signal.SIGINT)
    assert not list((cache / "sysroot").glob(".*.*")), "Ctrl-C leaves no temporary folder"
    interrupt(signal.SIGKILL)

    procs = [subprocess.Popen([tool("scons"), "-Q", "-j2", f"KDIR={kdir61}"], cwd=project,
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for project in projects[:2]]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("SYSROOT core" in out for out in outputs) == 1, outputs
    entries = [p for p in (cache / "sysroot").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].name.startswith("."), "the killed build's leftovers are gone"
    third = build_ok(projects[2], kdir61, env=env)
    assert "SYSROOT" not in third
    libdir = next(entries[0].glob("lib/rustlib/*/lib"))
    assert sorted(p.name for p in libdir.iterdir()) == ["libcompiler_builtins.rlib", "libcore.rlib"], \
        "hello names neither alloc nor rustko: they are not built"


# Bad input: one clear paragraph, a non-zero exit, never a traceback.

def bad(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = scons(project, *args, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    return output


def test_missing_kdir_lists_installed_headers(tmp_path: Path) -> None:
    project = copy_example(tmp_path / "hello")
    output = bad(project, "KDIR=/nonexistent/kdir")
    assert "KDIR /nonexistent/kdir does not exist" in output
    installed = [k for k in KDIRS.values() if k]
    assert all(f"KDIR={k}" in output for k in installed), output
    assert not (project / "build").exists()


def test_headers_of_another_arch(tmp_path: Path, kdir61: Path) -> None:
    output = bad(copy_example(tmp_path / "hello"), f"KDIR={kdir61}", "ARCH=arm64")
    assert "is configured for x86_64, but ARCH=arm64" in output


def test_rustc_without_library_sources(tmp_path: Path, kdir61: Path) -> None:
    """A real rustc whose sysroot has no rust-src (like rustup's without the component)."""
    empty = tmp_path / "empty-sysroot"
    empty.mkdir()
    wrapper = tmp_path / "rustc"
    wrapper.write_text('#!/bin/sh\n[ "$1 $2" = "--print sysroot" ] && { echo %s; exit 0; }\nexec /usr/bin/rustc "$@"\n'
                       % empty)
    wrapper.chmod(0o755)
    project = copy_example(tmp_path / "hello")
    output = bad(project, f"KDIR={kdir61}", f"RUSTC={wrapper}")
    assert "has no standard library sources" in output and "rust-web-src" in output
    output = bad(project, f"KDIR={kdir61}", f"RUST_LIB_SRC={empty}")
    assert f"{empty} (from RUST_LIB_SRC) has no core/src/lib.rs" in output


def test_crate_that_does_not_compile(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    lib = project / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace("let sum: u32", "let sum: &str"))
    output = bad(project, f"KDIR={kdir61}")
    assert "error[E0277]" in output or "error[E0308]" in output
    assert "src/lib.rs" in output
    assert "the crate of module hello" in output and "does not compile" in output
    assert not (project / "build" / "hello.ko").exists()


def test_hostile_module_name(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    (project / "SConstruct").write_text('env = Environment(tools=["default", "rustko"])\n'
                                        'env.RustKernelModule("../../evil name", "src/lib.rs")\n')
    output = bad(project, f"KDIR={kdir61}")
    assert "cannot be a module name" in output
    assert not (tmp_path / "evil name").exists() and not (project / "build").exists()


def test_scons_help_lists_the_variables(tmp_path: Path) -> None:
    result = scons(copy_example(tmp_path / "hello"), "-h")
    for name in ("KDIR", "ARCH", "CROSS_COMPILE", "LLVM", "RUSTC", "RUST_LIB_SRC", "SIGN_KEY", "SIGN_CERT", "V"):
        assert f"\n{name}:" in result.stdout


def test_cli_check_accepts_the_built_module(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    build_ok(project, kdir61)
    result = rustko("check", "--kdir", str(kdir61), str(project / "build" / "hello.ko"))
    assert result.returncode == 0, result.stdout + result.stderr
    # seeds/002: the same module's calls are R_X86_64_PLT32, which loaders before v4.16 refuse.
    old = rustko("check", "--arch", "x86_64", "--kernel-version", "4.15", str(project / "build" / "hello.ko"))
    assert old.returncode == 1 and "module: hello: Unknown rela relocation: 4" in old.stdout, old.stdout
    new = rustko("check", "--arch", "x86_64", "--kernel-version", "4.16", str(project / "build" / "hello.ko"))
    assert new.returncode == 0, new.stdout


def test_doctor_explains_every_flag(kdir61: Path) -> None:
    result = rustko("doctor", "--kdir", str(kdir61))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-Ccode-model=kernel" in result.stdout and "arch/x86/Makefile" in result.stdout
    assert "-Zplt=yes" in result.stdout and "[ok] rustc" in result.stdout
    missing = rustko("doctor", "--kdir", "/nonexistent")
    assert missing.returncode == 1 and "does not exist" in missing.stdout and "Traceback" not in missing.stderr


def test_verbose_shows_full_command_lines(tmp_path: Path, kdir61: Path) -> None:
    output = build_ok(copy_example(tmp_path / "hello"), kdir61, "V=1")
    assert "-Crelocation-model=static" in output and "--crate-type=staticlib" in output
    assert f"make -C {kdir61}" in output and "modpost" in output


def test_one_sconstruct_builds_for_several_kernels(tmp_path: Path) -> None:
    """Environments cloned with another KDIR build the same crate for each kernel."""
    project = copy_example(tmp_path / "multi")
    k61, k612 = require_kdir("6.1"), require_kdir("6.12")
    (project / "SConstruct").write_text(
        'base = Environment(tools=["default", "rustko"])\n'
        f'for tag, kdir in (("61", "{k61}"), ("612", "{k612}")):\n'
        '    env = base.Clone(KDIR=kdir)\n'
        '    env.RustKernelModule("hello", "src/lib.rs", build_dir=f"#build/{tag}")\n')
    result = scons(project, "-j2")
    assert result.returncode == 0, result.stdout + result.stderr
    for tag, kdir in (("61", k61), ("612", k612)):
        modinfo = subprocess.run(["modinfo", "-F", "vermagic", str(project / f"build/{tag}/hello.ko")],
                                 capture_output=True, text=True, check=True).stdout
        assert modinfo.startswith(probe(kdir).release + " ")


def test_crate_without_rust_exit_still_unloads(tmp_path: Path, kdir61: Path) -> None:
    """The shim's empty default exit (a weak definition) stands in when the crate has none."""
    project = copy_example(tmp_path / "noexit")
    lib = project / "src" / "lib.rs"
    text = lib.read_text()
    lib.write_text(text[:text.index("/// Called by the shim's `module_exit`.")] + text[text.index("#[panic_handler]"):])
    build_ok(project, kdir61)
    result = vm.vmtest(project / "build" / "hello.ko")
    assert result.loaded and result.unloaded, result.console[-2000:]
    assert not any("goodbye" in line for line in result.module_log)


def test_signed_module(tmp_path: Path, kdir61: Path) -> None:
    """SIGN_KEY/SIGN_CERT sign the .ko with KDIR's own sign-file and the kernel's hash; the
    checker and the real kernel take the signed file (Debian 6.1 does not enforce signatures)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.der"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=rustko test signer/", "-keyout", str(key), "-out", str(cert), "-outform", "DER"],
                   check=True, capture_output=True)
    project = copy_example(tmp_path / "hello")
    output = build_ok(project, kdir61, f"SIGN_KEY={key}", f"SIGN_CERT={cert}")
    assert "  SIGN    hello.ko" in output
    ko = project / "build" / "hello.ko"
    assert ko.read_bytes().endswith(b"~Module signature appended~\n")
    info = subprocess.run(["modinfo", "-F", "signer", str(ko)], capture_output=True, text=True, check=True)
    assert info.stdout.strip() == "rustko test signer"
    assert rustko("check", "--kdir", str(kdir61), str(ko)).returncode == 0
    booted = vm.vmtest(ko)
    assert booted.ok and any("hello from Rust" in line for line in booted.module_log)
    alone = scons(copy_example(tmp_path / "alone"), f"KDIR={kdir61}", f"SIGN_KEY={key}")
    assert alone.returncode != 0 and "SIGN_KEY and SIGN_CERT go together" in alone.stderr


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_path_dependencies(tmp_path: Path, kdir61: Path) -> None:
    """A crate split into local crates (transitively) builds into one module; editing a
    dependency rebuilds; a registry dependency is refused with what to do instead."""
    project = copy_example(tmp_path / "hello")
    _write(project / "vendor/primes-util/Cargo.toml",
           '[package]\nname = "primes-util"\nversion = "0.1.0"\nedition = "2021"\n\n'
           '[dependencies]\ninner = { path = "../inner" }\n')
    _write(project / "vendor/primes-util/src/lib.rs",
           "#![no_std]\npub fn sum_first(values: &[u32], n: usize) -> u32 {\n"
           "    inner::twice(values.iter().take(n).sum::<u32>()) / 2\n}\n")
    _write(project / "vendor/inner/Cargo.toml", '[package]\nname = "inner"\nversion = "0.1.0"\nedition = "2021"\n')
    _write(project / "vendor/inner/src/lib.rs", "#![no_std]\npub fn twice(x: u32) -> u32 { x * 2 }\n")
    manifest = project / "Cargo.toml"
    manifest.write_text(manifest.read_text() + '\n[dependencies]\nprimes-util = { path = "vendor/primes-util" }\n')
    lib = project / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace("let sum: u32 = primes.iter().sum();",
                                           "let sum: u32 = primes_util::sum_first(&primes, 3);"))
    build_ok(project, kdir61)
    result = vm.vmtest(project / "build" / "hello.ko")
    assert "hello: hello from Rust: sorted [2, 3, 5, 7, 11, 13], sum 10" in result.module_log, result.module_log
    inner = project / "vendor/inner/src/lib.rs"
    inner.write_text(inner.read_text() + "// edited\n")
    assert "  RUSTC   hello" in build_ok(project, kdir61)

    manifest.write_text(manifest.read_text() + 'heapless = "0.8"\n')
    refused = scons(project, f"KDIR={kdir61}")
    assert refused.returncode == 2 and "dependency 'heapless' is not a path dependency" in refused.stderr
    assert 'heapless = { path = "vendor/heapless" }' in refused.stderr and "Traceback" not in refused.stderr


def test_install_like_modules_install(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    stage = tmp_path / "stage"
    output = build_ok(project, kdir61, "install", f"INSTALL_MOD_PATH={stage}")
    release = probe(kdir61).release
    installed = stage / "lib/modules" / release / "extra/hello.ko"
    assert f"  INSTALL {installed}" in output
    assert installed.read_bytes() == (project / "build/hello.ko").read_bytes()
    found = subprocess.run(["modinfo", "-b", str(stage), "-k", release, "-F", "filename", "hello"],
                           capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == str(installed), found.stderr


def test_llvm_builds_and_loads(tmp_path: Path, kdir61: Path) -> None:
    """LLVM=1: ld.lld links the Rust object and Kbuild gets LLVM=1 (Debian's gcc-built headers
    still pin CC=gcc-12 in their .kernelvariables, so the shim stays gcc-compiled there)."""
    project = copy_example(tmp_path / "hello")
    output = build_ok(project, kdir61, "LLVM=1", "V=1")
    assert "ld.lld -m elf_x86_64 -r" in output and "LLVM=1" in output
    result = vm.vmtest(project / "build" / "hello.ko")
    assert result.ok and any("hello from Rust" in line for line in result.module_log)
