"""Issue 5: the support crate, `rustko new` templates and their behaviour in real kernels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO, copy_example, rustko, scons
from rustko import vm


def built(project: Path, kdir: Path, *args: str) -> None:
    result = scons(project, f"KDIR={kdir}", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_new_lists_templates_one_per_line() -> None:
    result = rustko("new", "--list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["hello", "params", "chardev"]


@pytest.mark.parametrize("args, message", [
    (["new", "bad-name"], "cannot be a module name"),
    (["new", "ok", "--template", "nope"], "no template 'nope'"),
    (["new"], "needs a NAME"),
])
def test_new_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    result = rustko(*args, "--dir", str(tmp_path / "out")) if len(args) > 1 else rustko(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_new_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = rustko("new", "mine", "--dir", str(target))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


# (template, commands run in the VM after insmod, what their output must contain)
TEMPLATE_RUNS = {
    "hello": ([], []),
    "params": (["cat /sys/module/demo/parameters/count", "cat /sys/module/demo/parameters/greeting",
                "echo Y > /sys/module/demo/parameters/shout && cat /sys/module/demo/parameters/shout"],
               ["2", "hey", "Y"]),
    "chardev": (["echo written from the VM > /dev/demo && cat /dev/demo", "ls -l /dev/demo"],
                ["written from the VM", "crw-rw-rw-"]),
}
# insmod arguments: the params template is loaded with its parameters set.
TEMPLATE_PARAMS = {"params": ["count=2", "greeting=hey"]}
TEMPLATE_LOG = {
    "hello": ["demo: hello from Rust: primes [2, 3, 5, 7], sum 17", "demo: goodbye from Rust (4 primes)"],
    "params": ["demo: hey #1", "demo: hey #2"],
    "chardev": ["demo: /dev/demo is ready"],
}


@pytest.mark.parametrize("template", list(TEMPLATE_RUNS))
def test_template_builds_and_works_in_the_real_kernel(tmp_path: Path, kdir: Path, template: str) -> None:
    project = tmp_path / "demo"
    created = rustko("new", "demo", "--template", template, "--dir", str(project))
    assert created.returncode == 0, created.stderr
    for name in ("SConstruct", "Cargo.toml", "src/lib.rs", "README.md", ".gitignore"):
        assert (project / name).is_file(), name
    built(project, kdir)
    commands, expected = TEMPLATE_RUNS[template]
    result = vm.vmtest(project / "build" / "demo.ko", run=commands, params=TEMPLATE_PARAMS.get(template, ()))
    assert result.ok, result.console[-3000:]
    for line in TEMPLATE_LOG[template]:
        assert line in result.module_log, result.module_log
    assert "demo: hey #3" not in result.module_log
    outputs = [output for _cmd, status, output in result.commands]
    assert all(status == 0 for _cmd, status, _out in result.commands), result.commands
    for want, got in zip(expected, outputs):
        assert want in got, result.commands


def test_runtime_helpers_alloc_failure_and_panic(tmp_path: Path, kdir61: Path) -> None:
    project = tmp_path / "runtime"
    shutil.copytree(REPO / "tests/modules/runtime", project, ignore=shutil.ignore_patterns("build"))
    built(project, kdir61, "-j2")
    good = vm.vmtest(project / "build" / "runtime.ko")
    assert good.ok, good.console[-3000:]
    a, b = 2**128 - 1, 18446744073709551629
    c, d = -(2**127) + 1, -7
    quotient = -(abs(c) // abs(d)) if (c < 0) != (d < 0) else abs(c) // abs(d)
    assert f"runtime: u128 {a} / {b} = {a // b} rem {a % b}" in good.module_log
    assert f"runtime: i128 {c} / {d} = {quotient} rem {c - quotient * d}" in good.module_log
    assert "runtime: try_reserve(1 TiB): ENOMEM" in good.module_log
    assert "runtime: try_push x1000: len 1000, sum 499500" in good.module_log
    assert "runtime: runtime unloaded, kept [1, 2, 3, 4]" in good.module_log

    panicked = vm.vmtest(project / "build" / "runtime_panic.ko")
    assert not panicked.ok
    assert ("runtime_panic: panicked at src/lib.rs:44:44: index out of bounds: the len is 3 but the index is 7"
            in panicked.module_log), panicked.module_log
    assert panicked.crash and any("kernel BUG at" in line for line in panicked.crash)


def test_floating_point_is_refused_at_build_time(tmp_path: Path, kdir61: Path) -> None:
    project = copy_example(tmp_path / "float")
    (project / "src" / "lib.rs").write_text(
        "#![no_std]\nuse rustko::prelude::*;\nstruct M;\n"
        "impl rustko::Module for M {\n    fn init() -> Result<Self> {\n"
        "        let x: f32 = core::hint::black_box(1.5);\n"
        "        pr_info!(\"{}\", (x * 2.5) as i32);\n        Ok(M)\n    }\n}\nrustko::module!(M);\n")
    result = scons(project, f"KDIR={kdir61}")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert "floating point used in kernel code" in output and "__mulsf3" in output
    assert "KBUILD" not in output, "refused before Kbuild runs"
