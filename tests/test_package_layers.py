"""The packages form a ladder: each imports only packages below it, so there are no import cycles.

Read from the source (every `import`, including those inside functions), so a lazy import cannot hide a
cycle. Entry points (`__main__.py` modules and `bmx/cli.py`) sit above every package and may import any.
"""

import ast
from pathlib import Path

from conftest import REPO_ROOT

# Lowest first. A package may import itself and anything on an earlier rung.
LADDER = (
    ("paths", "private_api"),
    ("config_io", "distributed", "compile_cache", "tokenizer"),
    ("model",),
    ("convert",),
    ("checkpoints",),
    ("lora",),
    ("tasks",),
    ("data",),
    ("quant",),
    ("generate",),
    ("eval",),
    ("merge",),
    ("train", "aot"),
)
RUNG = {package: rung for rung, packages in enumerate(LADDER) for package in packages}
BMX = REPO_ROOT / "bmx"


def package_of(path: Path) -> str:
    relative = path.relative_to(BMX).with_suffix("")
    return relative.parts[0]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        found |= {name.split(".")[1] for name in names if name.startswith("bmx.")}
    return found


def library_modules():
    for path in sorted(BMX.rglob("*.py")):
        if path.name == "__main__.py" or path == BMX / "cli.py" or path == BMX / "__init__.py":
            continue
        yield path


def test_every_package_has_a_rung():
    packages = {package_of(path) for path in library_modules()}
    assert packages <= set(RUNG), f"place {sorted(packages - set(RUNG))} on the ladder"


def test_no_package_imports_one_above_it():
    violations = []
    for path in library_modules():
        package = package_of(path)
        for imported in sorted(imported_packages(path)):
            if imported != package and RUNG.get(imported, -1) >= RUNG[package]:
                violations.append(f"{path.relative_to(REPO_ROOT)} ({package}) imports bmx.{imported}")
    assert not violations, "\n".join(violations)
