"""The installed layout: `components/` and `flows/` ship as `dalle_pipeline.components` and
`dalle_pipeline.flows`, every package folder is listed, and the wheel works outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
NOT_SHIPPED = {".git", ".venv", "tests", "bench", "notebooks", "infra", "docs", "build"}


def package_folders() -> dict[str, Path]:
    """Every folder of the checkout with an __init__.py (outside tests, tools and the venv), by the
    dotted name pyproject's package-dir gives it."""
    folders = {}
    for init in sorted(REPO.rglob("__init__.py")):
        relative = init.parent.relative_to(REPO)
        if relative.parts[0] in NOT_SHIPPED or relative.parts[0].startswith("."):
            continue
        top, *rest = relative.parts
        prefix = next((name for name, folder in SETUPTOOLS["package-dir"].items() if folder == top), None)
        assert prefix is not None, f"{relative} has an __init__.py but no package-dir entry maps {top}/"
        folders[".".join([prefix, *rest])] = init.parent
    return folders


def test_the_package_list_names_every_folder_with_an_init():
    assert sorted(SETUPTOOLS["packages"]) == sorted(package_folders())


def test_the_wheel_installs_dalle_pipeline_only_and_every_module_imports_from_outside_the_checkout(tmp_path):
    # built from a copy of what the wheel is made of, so setuptools' build/ folder lands there, not in the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *SETUPTOOLS["package-dir"].values()):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("dalle_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"dalle_pipeline", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}, tops
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    modules = sorted(name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                     for name in names if name.endswith(".py"))
    # a fresh interpreter outside the checkout, with this environment's dependencies but not its
    # editable install of the checkout: every module must come from the wheel
    script = f"""
import importlib, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [{str(site)!r}] + [p for p in sys.path if "editable" not in p and p not in ("", {str(REPO)!r})]
sys.path_importer_cache.clear()
for name in {modules!r}:
    module = importlib.import_module(name)
    assert module.__file__.startswith({str(site)!r}), (name, module.__file__)
for name in ("components", "flows"):
    assert importlib.util.find_spec(name) is None, name
print(len({modules!r}), "modules")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(modules)} modules" in result.stdout


def module_imports() -> dict[str, set[str]]:
    """The package's modules and the package modules each imports, at the top or inside a function."""
    import ast

    dotted = {}
    for prefix, folder in SETUPTOOLS["package-dir"].items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join([prefix, *(parts[:-1] if is_package else parts)])
            dotted[name] = (path, is_package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in dotted.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {target for target in found if target in dotted and target != name}
    return graph


def test_no_import_circle_and_no_module_past_450_lines():
    graph = module_imports()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                # a package's __init__ importing its own submodules is not a circle of ours
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    long = {str(path.relative_to(REPO)): lines for path in [*REPO.glob("components/**/*.py"), *REPO.glob("flows/*.py")]
            if (lines := len(path.read_text().splitlines())) > 450}
    assert not long, long
