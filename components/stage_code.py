"""What code a stage runs: the modules of `dalle_pipeline.components` its component imports, directly or not, at
the top or inside a function, read from their source (nothing imported), and a hash of that source, which goes
into the stage's key (`stage_cache.py`): a change to any code a stage runs re-runs it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import cache
from pathlib import Path

PACKAGE = __name__.rsplit(".", 1)[0]  # dalle_pipeline.components
COMPONENTS = Path(__file__).resolve().parent
# modules whose effect on a stage's output reaches its key through values, or that write none:
# the configs (their values are arguments), the override models, the MLflow seam, the stage cache and this module
NOT_STAGE_CODE = frozenset(f"{PACKAGE}.{name}" for name in ("config", "overrides", "tracking", "stage_cache",
                                                            "stage_code"))


@cache
def _module_file(module: str) -> Path | None:
    """The source file of a module of this package (found in its folder, nothing imported), or None."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    path = COMPONENTS.joinpath(*module.split(".")[len(PACKAGE.split(".")):])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The modules of this package that `module` imports anywhere in its source (`from .x import y`
    counts `.x` and, where it is a module, `.x.y`)."""
    path = _module_file(module)
    if path is None:
        raise ModuleNotFoundError(f"no module {module!r} in {COMPONENTS}")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
    return frozenset(name for name in named if name != module and _module_file(name) is not None)


@cache
def stage_code(module: str) -> tuple[str, ...]:
    """`module` and every package module it imports, transitively, less NOT_STAGE_CODE; sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_STAGE_CODE:
            continue
        seen.add(name)
        todo.extend(direct_imports(name))
    return tuple(sorted(seen))


def code_version(module: str) -> str:
    """A hash of the source of `stage_code(module)`."""
    digest = hashlib.sha256()
    for name in stage_code(module):
        digest.update(name.encode() + b"\0" + _module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()
