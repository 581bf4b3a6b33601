"""The SCons side as SCons users expect it: builders, signatures, layouts, clean, Kbuild parity.

Real rustc, real Debian headers, real Kbuild; the RustObject test boots the real 6.1 kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import elftools
from elftools.elf.elffile import ELFFile

from conftest import REPO, SITE, copy_example, require_kdir, scons, snapshot
from rustko import vm
from rustko.kernel import probe


def ok(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = scons(project, *args, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def refused(project: Path, *args: str) -> str:
    result = scons(project, *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    return output


UP_TO_DATE = "scons: `.' is up to date."


def global_int(ko: Path, symbol: str) -> int:
    """The initial value of an `int` the module defines (its bytes in the .ko's data section)."""
    with open(ko, "rb") as handle:
        elf = ELFFile(handle)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(symbol)[0]
        data = elf.get_section(sym["st_shndx"]).data()
        return int.from_bytes(data[sym["st_value"]:sym["st_value"] + 4], "little", signed=True)


def test_copied_site_scons_builds_without_rustko_installed(tmp_path: Path) -> None:
    """The classic layout: a project carrying site_scons/, a Python with only SCons, pyelftools
    and numpy (no rustko, no PYTHONPATH). `scons -h` shows real defaults and targets once."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = Path(elftools.__file__).parents[1]  # the test venv's site-packages
    for package in ("SCons", "elftools", "numpy", "numpy.libs"):
        if (ours / package).exists():
            (site / package).symlink_to(ours / package)
    project = copy_example(tmp_path / "hello")
    shutil.copytree(SITE, project / "site_scons", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import rustko"], env=env, cwd=tmp_path).returncode != 0
    kdir = require_kdir("6.1")
    run = subprocess.run([python, "-m", "SCons", "-Q", f"KDIR={kdir}"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (project / "build" / "hello.ko").is_file()
    # A second Environment (and a second load of the tool) adds no second copy of the help.
    (project / "SConstruct").write_text((project / "SConstruct").read_text()
                                        + 'Environment(tools=["default", "rustko"])\n')
    helped = subprocess.run([python, "-m", "SCons", "-h"], cwd=project, env=env, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.count("\nKDIR:") == 1 and "default: None" not in helped.stdout
    assert "default: /lib/modules/" in helped.stdout and "build/hello.ko" in helped.stdout
    assert "install" in helped.stdout and "vmtest-hello" in helped.stdout


def test_top_level_sconstruct_builds_and_cleans_every_example(tmp_path: Path, kdir61: Path) -> None:
    root = tmp_path / "rustko"
    root.mkdir()
    shutil.copy(REPO / "SConstruct", root)
    shutil.copytree(REPO / "site_scons", root / "site_scons", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "examples", root / "examples", ignore=shutil.ignore_patterns("build", ".sconsign*"))
    before = snapshot(root)
    ok(root, f"KDIR={kdir61}", "-j2")
    examples = sorted(p.name for p in (REPO / "examples").iterdir() if (p / "SConstruct").is_file())
    assert examples and all((root / "examples" / name / "build" / f"{name}.ko").is_file() for name in examples)
    ok(root, "-c", f"KDIR={kdir61}")
    assert snapshot(root) == before
    assert not list(root.glob("examples/*/build"))


def test_signature_holds_commands_and_texts(tmp_path: Path, kdir61: Path) -> None:
    """As Kbuild's if_changed: a changed rustc flag, shim text or runtime C rebuilds; V= and
    nothing else does. `-n` prints the commands and writes nothing; `-s` prints nothing."""
    project = copy_example(tmp_path / "hello")
    shutil.copytree(SITE, project / "site_scons", ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(project)
    dry = ok(project, "-n", "V=2", f"KDIR={kdir61}")
    assert snapshot(project) == before, "scons -n wrote files"
    assert "--crate-type=staticlib" in dry and f"make -C {kdir61}" in dry and "V=2" in dry
    assert ok(project, "-s", f"KDIR={kdir61}") == ""
    assert ok(project, f"KDIR={kdir61}", "V=1").strip() == UP_TO_DATE
    sconstruct = project / "SConstruct"
    text = sconstruct.read_text()
    sconstruct.write_text(text.replace('"src/lib.rs")', '"src/lib.rs", rustflags=["-Coverflow-checks=y"])'))
    assert "  RUSTC   hello" in ok(project, f"KDIR={kdir61}")
    assert ok(project, f"KDIR={kdir61}").strip() == UP_TO_DATE
    sconstruct.write_text(text.replace('"src/lib.rs")', '"src/lib.rs", description="changed shim")'))
    explained = ok(project, "--debug=explain", f"KDIR={kdir61}")
    assert "because the contents of the build action changed" in explained and "  KBUILD  hello.ko" in explained
    print_c = project / "site_scons/rustko/c/print.c"
    print_c.write_text(print_c.read_text() + "/* a new runtime */\n")
    assert "  KBUILD  hello.ko" in ok(project, f"KDIR={kdir61}")
    assert ok(project, f"KDIR={kdir61}").strip() == UP_TO_DATE


def test_variant_dirs_without_cargo_toml_and_partial_clean(tmp_path: Path, kdir61: Path) -> None:
    """The same SConscript under two variant dirs (SCons's default duplicate=1; hello has a
    `mod log;` file, and no Cargo.toml here) gives one .ko in each; `scons -c` of one module
    leaves the other; two environments writing one .ko is refused with the fix."""
    project = copy_example(tmp_path / "hello")
    (project / "Cargo.toml").unlink()
    (project / "SConscript").write_text('Import("env")\nenv.RustKernelModule("hello", "src/lib.rs", license="GPL")\n')
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'for variant in ("v1", "v2"):\n'
        '    SConscript("SConscript", variant_dir=f"out/{variant}", exports="env")\n')
    ok(project, f"KDIR={kdir61}", "-j2")
    for variant in ("v1", "v2"):
        assert (project / f"out/{variant}/build/hello.ko").is_file()
    ok(project, "-c", f"KDIR={kdir61}", "out/v1/build/hello.ko")
    assert not (project / "out/v1/build").exists() and (project / "out/v2/build/hello.ko").is_file()
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        f'for kdir in ("{kdir61}", "{require_kdir("6.12")}"):\n'
        '    env.Clone(KDIR=kdir).RustKernelModule("hello", "src/lib.rs", license="GPL")\n')
    output = refused(project)
    assert "build/hello.ko" in output and "build_dir=" in output


def test_clean_removes_only_what_the_build_made(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "hello")
    (project / "notes.txt").write_text("mine\n")
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'env.RustKernelModule("moda", "src/lib.rs", build_dir=".")\n'
        'env.RustKernelModule("modb", "src/lib.rs", build_dir="#")\n'
        'env.RustKernelModule("modc", "src/lib.rs")\n')
    before = snapshot(project)
    ok(project, f"KDIR={kdir61}", "-j2")
    dry = ok(project, "-c", "-n", f"KDIR={kdir61}")
    assert "Removed directory .\n" not in dry and "notes.txt" not in dry
    ok(project, "-c", f"KDIR={kdir61}", "moda.ko")
    assert not (project / "moda.ko").exists() and (project / "modb.ko").is_file()
    assert (project / "build/modc.ko").is_file()
    ok(project, "-c", f"KDIR={kdir61}")
    after = {k: v for k, v in snapshot(project).items() if not k.startswith(".sconsign")}
    assert after == before


def test_c_side_headers_ccflags_new_mod_and_failed_build(tmp_path: Path, kdir61: Path) -> None:
    """A header not listed in c_sources (in a subfolder) is still tracked, and the .ko holds its
    new value; ccflags reach the C files; a new `mod x;` rebuilds once, not twice; a failed
    build (signing) leaves no build/NAME.ko behind."""
    project = copy_example(tmp_path / "cglobal", "cglobal")
    (project / "src/inc").mkdir()
    (project / "src/answer.h").rename(project / "src/inc/answer.h")
    header = project / "src/inc/answer.h"
    header.write_text(header.read_text().replace("#endif", "#define ANSWER_OFFSET 2\n#endif"))
    answer_c = project / "src/answer.c"
    answer_c.write_text(answer_c.read_text().replace('#include "answer.h"', '#include "inc/answer.h"')
                        .replace("= 42;", "= ANSWER_BASE + ANSWER_OFFSET;"))
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'env.RustKernelModule("cglobal", ["src/lib.rs"], c_sources="src/answer.c", ccflags=["-DANSWER_BASE=40"])\n')
    ko = project / "build/cglobal.ko"
    ok(project, f"KDIR={kdir61}")
    assert global_int(ko, "cglobal_answer") == 42
    header.write_text(header.read_text().replace("ANSWER_OFFSET 2", "ANSWER_OFFSET 37"))
    assert "  KBUILD  cglobal.ko" in ok(project, f"KDIR={kdir61}")
    assert global_int(ko, "cglobal_answer") == 77
    assert ok(project, f"KDIR={kdir61}").strip() == UP_TO_DATE
    lib = project / "src/lib.rs"
    (project / "src/extra.rs").write_text("pub const EXTRA: i32 = 0;\n")
    lib.write_text(lib.read_text() + "\nmod extra;\n")
    assert "  RUSTC   cglobal" in ok(project, f"KDIR={kdir61}")
    assert ok(project, f"KDIR={kdir61}").strip() == UP_TO_DATE, "a new `mod` rebuilt a second time"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("not a key\n")
    cert.write_text("not a certificate\n")
    output = refused(project, f"KDIR={kdir61}", f"SIGN_KEY={key}", f"SIGN_CERT={cert}")
    assert "signing cglobal.ko failed" in output
    assert not ko.exists(), "a failed build left its module behind"


def _kdir_copy(kdir: Path, dest: Path) -> Path:
    """A private copy of Debian's headers folder (its symlinks made absolute) that a test may edit."""
    shutil.copytree(kdir, dest, symlinks=True)
    for link in dest.iterdir():
        if link.is_symlink():
            target = (kdir / os.readlink(link)).resolve()
            link.unlink()
            link.symlink_to(target)
    return dest


def test_kdir_change_rebuilds_and_home_does_not(tmp_path: Path, kdir61: Path) -> None:
    """A CRC changed in KDIR's Module.symvers rebuilds (the .ko carries the new one); another
    HOME (sudo) finds the same database; KDIR= on the command line beats Environment(KDIR=...)."""
    kdir = _kdir_copy(kdir61, tmp_path / "kdir")
    project = copy_example(tmp_path / "hello")
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"], KDIR="/nonexistent/kdir")\n'
        'env.RustKernelModule("hello", "src/lib.rs")\n')
    ok(project, f"KDIR={kdir}")
    assert ok(project, f"KDIR={kdir}", env={"HOME": str(tmp_path)}).strip() == UP_TO_DATE
    symvers = kdir / "Module.symvers"
    lines = symvers.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.split("\t")[1] == "_printk")
    crc, rest = lines[index].split("\t", 1)
    lines[index] = "0x12345678\t" + rest
    symvers.write_text("".join(lines))
    assert "  KBUILD  hello.ko" in ok(project, f"KDIR={kdir}")
    versions = subprocess.run(["modprobe", "--dump-modversions", str(project / "build/hello.ko")],
                              capture_output=True, text=True, check=True).stdout
    assert "0x12345678\t_printk" in versions, versions


def test_dollar_in_path_and_bad_source_forms(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "a$b" / "hello")
    ok(project, f"KDIR={kdir61}")
    assert (project / "build/hello.ko").is_file()
    (project / "SConstruct").write_text('env = Environment(tools=["default", "rustko"])\n'
                                        'env.RustKernelModule("hello", ["src/lib.rs", "src/log.rs"])\n')
    assert "source must be the crate root, one file" in refused(project, f"KDIR={kdir61}")


C_MODULE = """\
#include <linux/module.h>
#include <linux/init.h>

int rust_triple(int x);

static int __init cmod_init(void)
{
	pr_info("cmod: rust_triple(14) = %d\\n", rust_triple(14));
	return 0;
}

static void __exit cmod_exit(void)
{
	pr_info("cmod: goodbye\\n");
}

module_init(cmod_init);
module_exit(cmod_exit);
MODULE_LICENSE("GPL");
"""

RUST_PART = """\
#![no_std]

#[unsafe(no_mangle)]
pub extern "C" fn rust_triple(x: i32) -> i32 {
    x.wrapping_mul(3)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
"""


def test_c_kbuild_module_links_a_rust_object_in_the_real_kernel(tmp_path: Path, kdir61: Path) -> None:
    """A project's own C Kbuild module (its Kbuild file, its C) links env.RustObject's output as
    a `_shipped` object; the real 6.1 kernel loads it and the C code calls into Rust."""
    project = tmp_path / "cmod"
    (project / "cmod").mkdir(parents=True)
    (project / "rust").mkdir()
    (project / "rust/lib.rs").write_text(RUST_PART)
    (project / "cmod/main.c").write_text(C_MODULE)
    (project / "cmod/Kbuild").write_text("obj-m := cmod.o\ncmod-y := main.o rustpart.o\n")
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'rust = env.RustObject("cmod/rustpart.o_shipped", "rust/lib.rs")\n'
        'ko = env.KbuildModule("cmod/cmod.ko", ["cmod/Kbuild", "cmod/main.c", rust])\n'
        'env.RustkoCheck("checked/cmod.ko", ko)\n')
    output = ok(project, f"KDIR={kdir61}")
    assert "  RUSTC   rustpart.o_shipped" in output and "  KBUILD  cmod.ko" in output
    assert ok(project, f"KDIR={kdir61}").strip() == UP_TO_DATE
    result = vm.vmtest(project / "checked/cmod.ko")
    assert result.ok, result.console[-2000:]
    assert "cmod: rust_triple(14) = 42" in result.module_log, result.module_log
    (project / "cmod/notes.txt").write_text("mine\n")
    ok(project, f"KDIR={kdir61}", "-c")
    left = sorted(p.name for p in (project / "cmod").iterdir() if p.name != ".sconsign.dblite")
    assert left == ["Kbuild", "main.c", "notes.txt"], "Kbuild's files stay after scons -c"


EXPORTER_C = """\
#include <linux/export.h>

int exporter_value(void)
{
	return 7;
}
EXPORT_SYMBOL_GPL(exporter_value);
"""


def test_extra_symbols_and_modules_install_like_612(tmp_path: Path) -> None:
    """KBUILD_EXTRA_SYMBOLS: a second module using the first one's export builds without
    modpost's 'undefined' warning. `scons install` for 6.12 does what its modules_install does:
    updates/, INSTALL_MOD_STRIP, CONFIG_MODULE_COMPRESS_XZ (.ko.xz), depmod."""
    kdir = require_kdir("6.12")
    project = copy_example(tmp_path / "hello")
    (project / "src/exporter.c").write_text(EXPORTER_C)
    (project / "user").mkdir()
    (project / "user/lib.rs").write_text(
        '#![no_std]\nunsafe extern "C" { fn exporter_value() -> i32; }\n'
        '#[unsafe(no_mangle)]\npub extern "C" fn rust_init() -> i32 { unsafe { exporter_value() - 7 } }\n'
        "#[panic_handler]\nfn panic(_info: &core::panic::PanicInfo) -> ! { loop {} }\n")
    (project / "SConstruct").write_text(
        'env = Environment(tools=["default", "rustko"])\n'
        'first = env.RustKernelModule("exporter", "src/lib.rs", c_sources=["src/exporter.c"])\n'
        'env.RustKernelModule("user", "user/lib.rs", license="GPL", extra_symbols=[first])\n')
    stage = tmp_path / "stage"
    output = ok(project, f"KDIR={kdir}", "install", f"INSTALL_MOD_PATH={stage}", "INSTALL_MOD_STRIP=1", "V=1")
    assert "KBUILD_EXTRA_SYMBOLS=" in output and '"exporter_value" [' not in output, output
    release = probe(kdir).release
    for name in ("exporter", "user"):
        installed = stage / "lib/modules" / release / f"updates/{name}.ko.xz"
        assert installed.is_file() and not installed.with_suffix("").exists()
        found = subprocess.run(["modinfo", "-b", str(stage), "-k", release, "-F", "filename", name],
                               capture_output=True, text=True)
        assert found.stdout.strip() == str(installed), found.stderr
    unpacked = subprocess.run(["xz", "-dc", str(stage / "lib/modules" / release / "updates/user.ko.xz")],
                              capture_output=True, check=True).stdout
    assert len(unpacked) < (project / "build/user.ko").stat().st_size, "INSTALL_MOD_STRIP=1 stripped nothing"
    depends = subprocess.run(["modinfo", "-b", str(stage), "-k", release, "-F", "depends", "user"],
                             capture_output=True, text=True).stdout.strip()
    assert depends == "exporter"


def test_path_dependency_tracked_under_variant_dir_without_duplicates(tmp_path: Path, kdir61: Path) -> None:
    """variant_dir with duplicate=0: an edit in a path dependency's sources rebuilds, and the
    build after that one builds nothing."""
    project = copy_example(tmp_path / "hello")
    (project / "vendor/inner/src").mkdir(parents=True)
    (project / "vendor/inner/Cargo.toml").write_text('[package]\nname = "inner"\nversion = "0.1.0"\nedition = "2021"\n')
    inner = project / "vendor/inner/src/lib.rs"
    inner.write_text("#![no_std]\npub fn twice(x: u32) -> u32 { x * 2 }\n")
    manifest = project / "Cargo.toml"
    manifest.write_text(manifest.read_text() + '\n[dependencies]\ninner = { path = "vendor/inner" }\n')
    lib = project / "src/lib.rs"
    lib.write_text(lib.read_text().replace("let sum: u32 = primes.iter().sum();",
                                           "let sum: u32 = inner::twice(primes.iter().sum());"))
    (project / "SConscript").write_text('Import("env")\nenv.RustKernelModule("hello", "src/lib.rs")\n')
    (project / "SConstruct").write_text('env = Environment(tools=["default", "rustko"])\n'
                                        'SConscript("SConscript", variant_dir="out", duplicate=0, exports="env")\n')
    ok(project, f"KDIR={kdir61}")
    assert (project / "out/build/hello.ko").is_file()
    assert "is up to date" in ok(project, f"KDIR={kdir61}").splitlines()[-1]
    inner.write_text(inner.read_text().replace("x * 2", "x * 3"))
    assert "  RUSTC   hello" in ok(project, f"KDIR={kdir61}")
    quiet = ok(project, f"KDIR={kdir61}")
    assert "is up to date" in quiet and "RUSTC" not in quiet, quiet


def test_module_name_with_dashes(tmp_path: Path, kdir61: Path) -> None:
    """As in Kbuild: my-mod.ko, whose name in the kernel (KBUILD_MODNAME) is my_mod."""
    project = copy_example(tmp_path / "hello")
    (project / "SConstruct").write_text('env = Environment(tools=["default", "rustko"])\n'
                                        'env.RustKernelModule("my-mod", "src/lib.rs")\n')
    ok(project, f"KDIR={kdir61}")
    name = subprocess.run(["modinfo", "-F", "name", str(project / "build/my-mod.ko")],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert name == "my_mod"


# Printed by the SConstruct below right after RustKernelModule(): its own children running Kbuild.
MAKES_WHILE_READING = '''
import os
def kbuild_children():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
            argv = open(f"/proc/{pid}/cmdline").read().split("\\0")
        except OSError:
            continue
        if ppid == str(os.getpid()) and any(arg.startswith("M=") for arg in argv):
            found.append(pid)
    return found
print("makes while reading:", len(kbuild_children()))
env.Command("other.txt", [], Touch("$TARGET"))
'''


def _kbuild_processes(folder: Path) -> list[str]:
    """Processes (anyone's) whose command line names `folder` as Kbuild's M=."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"M={folder}".encode() in argv:
            found.append(pid)
    return found


def test_kbuild_starts_while_the_sconstruct_is_read(tmp_path: Path, kdir61: Path) -> None:
    """A module sure to be built gets its make (Kbuild's compiler checks) started while the
    SConstruct is read, and the build takes that run over: one `make -C` per build, the same
    .ko as a build started late (V=1 starts no make early). A run that does not build the module
    after all stops the early make and leaves nothing running; `-n` starts none."""
    project = copy_example(tmp_path / "hello")
    sconstruct = project / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace("env.RustKernelModule(", "ko = env.RustKernelModule(")
                          + MAKES_WHILE_READING)
    wrappers, log = tmp_path / "bin", tmp_path / "make.log"
    wrappers.mkdir()
    (wrappers / "make").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec /usr/bin/make "$@"\n')
    (wrappers / "make").chmod(0o755)
    env = {"PATH": f"{wrappers}:{os.environ['PATH']}"}
    kbuild_dir = project / "build/.rustko/hello/kbuild"

    assert "makes while reading: 0" in ok(project, "-n", f"KDIR={kdir61}", env=env)
    assert not log.exists() and not (project / "build").exists()
    output = ok(project, f"KDIR={kdir61}", "other.txt", env=env)
    assert "makes while reading: 1" in output and (project / "other.txt").is_file()
    assert not (project / "build/hello.ko").exists() and _kbuild_processes(kbuild_dir) == []

    log.unlink()
    assert "makes while reading: 1" in ok(project, f"KDIR={kdir61}", env=env)
    assert len([line for line in log.read_text().splitlines() if line.startswith("-C ")]) == 1
    early = (project / "build/hello.ko").read_bytes()
    ok(project, "-c", f"KDIR={kdir61}")
    assert "makes while reading: 0" in ok(project, f"KDIR={kdir61}", "V=1", env=env)
    assert (project / "build/hello.ko").read_bytes() == early
    assert ok(project, f"KDIR={kdir61}", env=env).splitlines() == ["makes while reading: 0", UP_TO_DATE]
