"""No function in lafs_fast/ is longer than 80 lines: a reader follows a training step or an op
through small named parts (kernels/ holds Triton kernels and is not part of this rule)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lafs_fast"
MAX_LINES = 80


def long_functions(root: pathlib.Path, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (n lines)' of every function or method in root's .py files longer than limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "kernels" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in sorted(ast.walk(tree), key=lambda node: getattr(node, "lineno", 0)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_in_the_package_is_longer_than_80_lines():
    assert PACKAGE.is_dir()
    assert long_functions(PACKAGE) == [], "split these into named parts"


def _function(name: str, n_lines: int, indent: str = "") -> str:
    """Source of a function of n_lines lines (its def line included)."""
    return f"{indent}def {name}():\n" + f"{indent}    x = 1\n" * (n_lines - 1)


def test_the_check_sees_functions_methods_and_nested_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text(_function("short", 80) + _function("long", 81))
    (pkg / "sub" / "b.py").write_text("class K:\n" + _function("method", 81, "    ")
                                      + "def outer():\n" + _function("inner", 81, "    "))
    assert long_functions(pkg) == ["pkg/a.py:81 long (81 lines)", "pkg/sub/b.py:2 method (81 lines)",
                                   "pkg/sub/b.py:83 outer (82 lines)", "pkg/sub/b.py:84 inner (81 lines)"]
