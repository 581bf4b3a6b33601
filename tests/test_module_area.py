"""Differential: modules whose memory the loader cannot place, in Debian's real arm64 6.1 kernel
(QEMU, TCG) and UML 6.1 kernel. C modules with a large .bss (free on disk) are built by Kbuild
against each KDIR; the checker's verdict, first line and errno must be what the kernel and
busybox's insmod say. The tables: rustko.loader MODULE_AREA and the module-area rules.

arm64 6.1 (Debian: CONFIG_ARM64_MODULE_PLTS) tries a 128 MiB window, then a 2 GiB one that also
holds the kernel image: a module past the first loads, one past the second is refused. The exact
limit inside the 2 GiB window (less the image and earlier users) and the machine's RAM (the
guest has 1 GiB: vmalloc refuses more pages than that first) are not in a KDIR, so the checker
refuses only what no arm64 machine could place. UML's modules are bounded by its RAM (mem=):
the same module is refused with a small mem= and loads with a larger one, and the checker gives
no flat verdict on it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import release_kdir, rustko, tool
from rustko import check, loader, uml
from rustko.cache import cached_dir
from rustko.kbuild import KbuildJob
from rustko.kernel import KernelInfo, probe
from rustko.vm import VmResult, debian_kernel, vmtest_many
from test_check import CACHE, _key
from test_check_loader import INSMOD_SAYS

SOURCE = r"""
#include <linux/module.h>
#ifdef BIG
static char rk_area[BIG];
#endif
#ifdef PCPU
/* What DEFINE_PER_CPU writes on an SMP kernel (a UML build puts it in .data): twice the 8 KiB
   reserve an SMP kernel's modules share. */
static char rk_pcpu[PCPU] __attribute__((section(".data..percpu"), used));
#endif
static int __init m_init(void)
{
#ifdef TOUCH
	rk_area[BIG - 1] = 1;
#endif
#ifdef BIG
	pr_info("rkarea %px\n", rk_area);
#endif
	return 0;
}
static void __exit m_exit(void) { }
module_init(m_init);
module_exit(m_exit);
MODULE_LICENSE("GPL");
"""

MIB = 1 << 20
ARM64 = {
    # Past the 128 MiB direct window: module_alloc's fallback to the 2 GiB window places it.
    "wide": f"-DBIG={160 * MIB:#x} -DTOUCH",
    # 4256 MiB: the loader's unsigned int sum wraps to about 160 MiB, which it places.
    "wrap": f"-DBIG={(4096 + 160) * MIB:#x}",
    # Past the 2 GiB window (and still below 4 GiB, where the loader's unsigned int sizes wrap).
    "huge": f"-DBIG={2048 * MIB:#x}",
}
UML = {
    # More than a mem=64M UML has in RAM, less than a mem=256M one has free.
    "big": f"-DBIG={96 * MIB:#x} -DTOUCH",
    "percpu": "-DPCPU=16384",
}


def _kdir(arch: str) -> Path:
    done = rustko("kdir", "--arch", arch, timeout=900)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def _build(kernel: KernelInfo, variant: str, flags: str) -> Path:
    """One C module by the KDIR's own Kbuild (cached by source, flags and KDIR)."""
    def fill(tmp: Path) -> None:
        (tmp / "rkarea.c").write_text(SOURCE)
        (tmp / "Kbuild").write_text(f"obj-m += rkarea.o\nccflags-y += {flags}\n")
        done = subprocess.run(KbuildJob(kernel, tmp).make_command(), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    key = _key(SOURCE, flags, str(kernel.kdir))
    return cached_dir(CACHE / f"area-{kernel.arch}-{variant}-{key}", fill) / "rkarea.ko"


def _refused_as_predicted(finding: check.Finding, result: VmResult) -> None:
    """The kernel refused the module with the checker's first line (in the module's own part of
    the log) and insmod's words for the checker's errno."""
    assert not result.loaded, result.console[-3000:]
    assert INSMOD_SAYS[finding.errno] in (result.insmod_error or ""), (finding, result.insmod_error)
    log = "\n".join(result.module_log)
    if finding.kernel:
        assert finding.kernel_regex().search(log), (finding.kernel, log[-3000:])
    else:
        assert result.refusal is None, result.refusal


@pytest.fixture(scope="module")
def arm64() -> tuple[KernelInfo, dict[str, Path], list[VmResult]]:
    """The arm64 modules in one boot: the wide and the wrapping one load, then the huge one is
    refused (one refusal per boot: warn_alloc prints at most one line in 10 s)."""
    tool("qemu-system-aarch64")
    kernel = probe(_kdir("arm64"))
    built = {variant: _build(kernel, variant, flags) for variant, flags in ARM64.items()}
    return kernel, built, vmtest_many([built["wide"], built["wrap"], built["huge"]], arch="arm64",
                                      timeout=300)


def test_arm64_spills_past_the_direct_window(arm64) -> None:
    """160 MiB is more than MODULES_VSIZE: Debian's kernel (module PLTs) places it in the 2 GiB
    window, as the checker says."""
    kernel, built, results = arm64
    assert check.check_module(built["wide"], kernel) == []
    assert results[0].ok, results[0].failure or results[0].console[-3000:]
    assert any(line.startswith("rkarea ") for line in results[0].module_log)


def test_arm64_larger_than_the_2g_window(arm64) -> None:
    """2 GiB of .bss: refused with 6.1's warn_alloc line; its size is the module's core
    allocation, which the checker's lower bound does not exceed."""
    kernel, built, results = arm64
    findings = check.check_module(built["huge"], kernel)
    assert [f.kind for f in findings] == ["module-area-vmalloc"]
    assert findings[0].kernel == ["vmalloc error: size <val>"] and "2 GiB" in findings[0].explanation
    _refused_as_predicted(findings[0], results[2])
    # The guest's RAM (1 GiB) is what vmalloc tests first; the explanation names this ending.
    said = re.search(r"insmod: vmalloc error: size (\d+), exceeds total pages", "\n".join(results[2].module_log))
    assert said and "exceeds total pages" in findings[0].explanation
    needs = int(re.search(r"needs (\d+) bytes", findings[0].hint)[1])
    assert 2048 * MIB <= needs <= int(said[1]) < needs + MIB
    # Without a KDIR: the widest arm64 window is assumed, and this module is past it too.
    alone = check.check_module(built["huge"], arch="arm64", version=kernel.version)
    assert [f.kind for f in alone] == ["module-area-vmalloc"]
    assert check.check_module(built["wide"], arch="arm64", version=kernel.version) == []


def test_arm64_past_4g_wraps_and_loads(arm64) -> None:
    """4256 MiB of .bss: the loader's 32-bit sum of the module's sizes wraps, so it allocates
    about 160 MiB and loads the module; the checker gives no verdict past 4 GiB."""
    kernel, built, results = arm64
    assert check.check_module(built["wrap"], kernel) == []
    assert results[1].ok, results[1].failure or results[1].console[-3000:]


ARM64_73 = "7.3.4+deb13-arm64"  # tests/test_generations.py's arm64 kernel (execmem)


@pytest.fixture(scope="module")
def arm64_73(arm64) -> tuple[KernelInfo, Path, list[VmResult]]:
    """Debian's arm64 7.3 (its KDIR in a trixie root, as tests/test_generations.py prepares it):
    first the wide module built for 6.1, then the huge one built for 7.3."""
    kernel = probe(release_kdir(ARM64_73))
    huge = _build(kernel, "huge", ARM64["huge"])
    wide61 = arm64[1]["wide"]
    results = vmtest_many([wide61, huge], kernel=debian_kernel(ARM64_73, "arm64"), arch="arm64",
                          timeout=300)
    return kernel, huge, results


def test_arm64_execmem_larger_than_the_2g_window(arm64_73) -> None:
    """Since execmem (v6.10) vmalloc is asked with __GFP_NOWARN on both windows and execmem says
    it once: the line the checker predicts for 7.3."""
    kernel, huge, results = arm64_73
    findings = check.check_module(huge, kernel)
    assert [f.kind for f in findings] == ["module-area-vmalloc"]
    assert findings[0].kernel == ["execmem: unable to allocate memory"]
    _refused_as_predicted(findings[0], results[1])
    assert not any("vmalloc error" in line for line in results[1].module_log), results[1].module_log


def test_arm64_struct_module_of_another_kernel(arm64, arm64_73) -> None:
    """The struct module size rule on arm64: sizeof(struct module) measured by the arm64 7.3
    KDIR's own (cross) Kbuild refuses a module built for 6.1 before anything else."""
    kernel, _, results = arm64_73
    findings = check.check_module(arm64[1]["wide"], kernel)
    assert findings[0].kind == "this-module-size", findings
    _refused_as_predicted(findings[0], results[0])


def test_arm64_window_per_config() -> None:
    """Without module PLTs (or with KASAN but not KASAN_VMALLOC) 6.1 has only the 128 MiB window;
    6.12's execmem always falls back to 2 GiB."""
    area = loader.MODULE_AREA["arm64"].size
    assert area(lambda o: o == "ARM64_MODULE_PLTS") == 2048 * MIB - loader.PAGE_SIZE
    assert area(lambda o: o in ("ARM64_MODULE_PLTS", "KASAN_GENERIC")) == 128 * MIB - loader.PAGE_SIZE
    assert area(lambda o: False) == 128 * MIB - loader.PAGE_SIZE
    assert area(lambda o: o == "EXECMEM") == 2048 * MIB - loader.PAGE_SIZE
    assert loader.RULES["module-area-vmalloc"].text((6, 12)) == ["execmem: unable to allocate memory"]


@pytest.fixture(scope="module")
def um() -> tuple[KernelInfo, dict[str, Path], dict[str, list[VmResult]]]:
    """UML with mem=64M: the percpu module (loads), then the big one; with mem=256M: the big one."""
    if not uml.KERNEL.is_file():
        pytest.fail(f"{uml.KERNEL} is missing: run ./dev setup (installs user-mode-linux)")
    kernel = probe(_kdir("um"))
    built = {variant: _build(kernel, variant, flags) for variant, flags in UML.items()}
    boots = {mem: vmtest_many(modules, arch="um", mem=mem, timeout=300)
             for mem, modules in (("64M", [built["percpu"], built["big"]]), ("256M", [built["big"]]))}
    return kernel, built, boots


def test_uml_module_size_depends_on_mem(um) -> None:
    """96 MiB of .bss: refused by a mem=64M UML (more pages than its RAM, the line the table's
    rule names), loaded by a mem=256M one; the checker, which cannot know mem=, says nothing."""
    kernel, built, boots = um
    area = loader.MODULE_AREA["um"]
    assert area.size is None and "mem=" in area.why
    assert check.check_module(built["big"], kernel) == []
    refused, loaded = boots["64M"][1], boots["256M"][0]
    rule = loader.RULES[area.rule]
    line = check.Finding("", "module", area.rule, rule.text(kernel.version), "", errno=rule.errno)
    _refused_as_predicted(line, refused)
    assert re.search(r"insmod: vmalloc error: size \d+, exceeds total pages", "\n".join(refused.module_log))
    assert loaded.ok, loaded.failure or loaded.console[-3000:]
    assert any(line.startswith("rkarea ") for line in loaded.module_log)


def test_uml_percpu_data_is_ordinary_data(um) -> None:
    """UML is uniprocessor: its loader has no per-CPU section (find_pcpusec returns 0), so 16 KiB
    of .data..percpu, twice what an SMP kernel reserves, loads as plain data; the checker agrees."""
    kernel, built, boots = um
    assert check.check_module(built["percpu"], kernel) == []
    assert boots["64M"][0].ok, boots["64M"][0].failure or boots["64M"][0].console[-3000:]
    # The same bytes against an SMP kernel's rules are refused (the reserve is 8 KiB).
    smp = check.KernelView("x86_64", kernel.version, percpu_reserve=8 << 10)
    assert [f.kind for f in check.check_module(built["percpu"], smp)] == ["percpu-reserve"]
