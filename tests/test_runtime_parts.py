"""The shim carries the runtime parts (site_scons/rustko/c/*.c) a module's files name: all of them
for a module linking the support crate, else those whose `rustko_*` functions its files name."""

from __future__ import annotations

from pathlib import Path

from conftest import copy_example, scons
from rustko import kbuild, vm

EVERY_PART = tuple(sorted(path.name for path in kbuild.RUNTIME_DIR.glob("*.c")))


def test_parts_follow_the_names_in_the_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.rs"
    plain.write_text("#![no_std]\n#[no_mangle]\npub extern \"C\" fn rust_init() -> i32 { 0 }\n")
    mutex = tmp_path / "mutex.rs"
    mutex.write_text('extern "C" { fn rustko_mutex_new() -> *mut u8; }\n')
    c_file = tmp_path / "glue.c"
    c_file.write_text("void glue(void) { rustko_bug(); }\n")
    assert kbuild.runtime_parts([plain], support_crate=False) == ()
    assert kbuild.runtime_parts([plain, mutex], support_crate=False) == ("mutex.c",)
    assert kbuild.runtime_parts([plain, mutex, c_file], support_crate=False) == ("bug.c", "mutex.c")
    assert kbuild.runtime_parts([plain], support_crate=True) == EVERY_PART
    assert kbuild.runtime_parts([tmp_path / "gone.rs"], support_crate=False) == EVERY_PART

    shim = kbuild.shim_source(kbuild.ModuleInfo(name="m"), ("mutex.c",))
    assert "rustko_mutex_new" in shim and "rustko_printk" not in shim and "miscdevice" not in shim
    assert kbuild.shim_source(kbuild.ModuleInfo(name="m")) == kbuild.shim_source(kbuild.ModuleInfo(name="m"),
                                                                                  EVERY_PART)
    # A name no file wrote out (put together by a macro) is caught before Kbuild links.
    assert kbuild.missing_runtime(("print.c",), {"rustko_printk", "rustko_kmalloc", "printk"}) == ["rustko_kmalloc"]


def test_module_calling_one_part_without_the_support_crate_loads(tmp_path: Path, kdir61: Path) -> None:
    """examples/hello plus a kmalloc'd buffer through alloc.c: the shim carries print.c and
    alloc.c only, and Debian's real 6.1 kernel loads and runs the module."""
    project = copy_example(tmp_path / "parts")
    lib = project / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace(
        "    0\n}\n",
        '    extern "C" {\n'
        "        fn rustko_kmalloc(size: usize, align: usize, zeroed: i32) -> *mut u8;\n"
        "        fn rustko_kfree(ptr: *mut u8);\n"
        "    }\n"
        "    // SAFETY: a zeroed 64-byte buffer from the kernel, freed before returning.\n"
        "    let zero = unsafe {\n"
        "        let buf = rustko_kmalloc(64, 8, 1);\n"
        "        if buf.is_null() { return -12; }\n"
        "        let zero = *buf.add(63);\n"
        "        rustko_kfree(buf);\n"
        "        zero\n"
        "    };\n"
        "    let mut line = KernelLog::info();\n"
        '    let _ = write!(line, "kmalloc gave zeroed memory: {}", zero == 0);\n'
        "    line.flush();\n"
        "    0\n}\n", 1))
    result = scons(project, f"KDIR={kdir61}")
    assert result.returncode == 0, result.stdout + result.stderr
    shim = (project / "build/.rustko/hello/kbuild/hello_shim.c").read_text()
    assert "rustko_kmalloc" in shim and "rustko_printk" in shim
    assert "rustko_mutex_new" not in shim and "miscdevice" not in shim
    booted = vm.vmtest(project / "build" / "hello.ko")
    assert booted.ok, booted
    assert any("kmalloc gave zeroed memory: true" in line for line in booted.module_log), booted.module_log


def test_float_is_refused_after_the_object_went_to_kbuild(tmp_path: Path, kdir61: Path) -> None:
    """The undefined symbols are checked while Kbuild already links the object: a refusal still
    fails the build with its reason, publishes nothing, and leaves no make behind."""
    project = copy_example(tmp_path / "float")
    lib = project / "src" / "lib.rs"
    lib.write_text(lib.read_text().replace(
        "    let sum: u32 = primes.iter().sum();\n",
        "    let sum: u32 = primes.iter().sum();\n"
        "    let third = core::hint::black_box(sum as f64) / core::hint::black_box(3.0f64);\n"
        "    let sum = sum + third as u32;\n", 1))
    result = scons(project, f"KDIR={kdir61}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "needs symbols no kernel provides" in output and "__divdf3" in output, output
    assert "Traceback" not in output
    assert not (project / "build" / "hello.ko").exists()
    kbuild_dir = project / "build" / ".rustko" / "hello" / "kbuild"
    left = [cmdline for cmdline in _command_lines() if f"M={kbuild_dir}".encode() in cmdline]
    assert not left, f"make still runs: {left}"


def _command_lines() -> list[bytes]:
    """Every running process's command line (/proc/PID/cmdline)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:
                pass  # ended meanwhile
    return found
