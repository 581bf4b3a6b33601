"""`rustko new`: a module project, ready to build, from a template."""

from __future__ import annotations

import argparse
import getpass
import sys
from dataclasses import dataclass
from pathlib import Path

from . import dkms
from .errors import RustkoError
from .project import check_name

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Template:
    summary: str
    try_it: str   # shell lines for the generated README, after the build


TEMPLATES: dict[str, Template] = {
    "hello": Template("logs a line formatted with core::fmt when loaded, another when unloaded",
                      "rustko vmtest build/{name}.ko"),
    "params": Template("module parameters (int, charp, bool) under /sys/module/NAME/parameters",
                       "rustko vmtest build/{name}.ko --param count=5 --run 'cat /sys/module/{name}/parameters/count'"),
    "chardev": Template("a misc character device /dev/NAME that echoes back what was written",
                        "rustko vmtest build/{name}.ko --run 'echo hi > /dev/{name} && cat /dev/{name}'"),
}

README = """\
# {name}

A Linux kernel module in Rust ({summary}), built with rustko from the `{template}`
template.

## Build, check, try

```sh
scons                                   # or: scons KDIR=/usr/src/linux-headers-<release>
rustko check --kdir <the same KDIR> build/{name}.ko
{try_it}
```

`scons -h` lists the build variables (KDIR, ARCH, CROSS_COMPILE, LLVM, RUSTC, RUST_LIB_SRC, V);
`scons -c` removes everything the build made.

## Layout

- `src/lib.rs`: the module. `rustko::module!(T)` makes `T::init()` the module's init and
  dropping `T` its exit; `pr_info!` and friends log through the kernel's printk.
- `Cargo.toml`: name, license, author and description (`[package.metadata.kernel]`), and
  module parameters (`[package.metadata.kernel.params.NAME]`).
- `SConstruct`: one `env.RustKernelModule()` call.
- `dkms.conf`: for Debian's DKMS, which rebuilds the module for every kernel installed
  (`rustko dkms` rewrites it after a change of name, version or modules).
"""


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def create(name: str, template: str = "hello", dest: Path | None = None, author: str | None = None) -> Path:
    """Write the project into `dest` (default ./NAME), which must not exist or be empty."""
    check_name(name)
    if template not in TEMPLATES:
        raise RustkoError(f"no template '{template}'", f"templates: {', '.join(TEMPLATES)} (`rustko new --list`)")
    target = dest or Path(name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RustkoError(f"{target} already exists and is not empty", "choose another NAME or --dir")
    source = TEMPLATE_DIR / template
    values = {"name": name, "author": author if author is not None else getpass.getuser()}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(source)
            out = target / (".gitignore" if rel.name == "gitignore" else rel)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(path.read_text(), values))
        info = TEMPLATES[template]
        (target / "README.md").write_text(README.format(
            name=name, template=template, summary=info.summary.replace("NAME", name),
            try_it=info.try_it.format(name=name)))
        dkms.write(target)
    except OSError as err:
        raise RustkoError(f"cannot write {target}: {err.strerror}") from None
    return target


def _run(args: argparse.Namespace) -> int:
    if args.list:
        for name, info in TEMPLATES.items():
            print(f"{name:<9} {info.summary}")
        return 0
    if not args.name:
        raise RustkoError("rustko new needs a NAME", "e.g. `rustko new mymod --template chardev`")
    path = create(args.name, args.template, Path(args.dir) if args.dir else None)
    print(f"created {path}/ from template {args.template}: cd {path} && scons", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("new", help="create a module project from a template",
                                   description="Create a kernel module project, ready to build with scons.")
    parser.add_argument("name", nargs="?", help="module name (a C identifier)")
    parser.add_argument("--template", "-t", default="hello", help="template (default: hello)")
    parser.add_argument("--dir", help="where to create it (default: ./NAME)")
    parser.add_argument("--list", action="store_true", help="list the templates, one per line")
    parser.set_defaults(run=_run)
