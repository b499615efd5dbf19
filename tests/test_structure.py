"""The shape of the code: no function over 60 lines (unless a `# NOTE: longer than 60 lines because ...`
in it says why) and no import cycle
inside npukit/ (module-level and function-level imports both count; `if TYPE_CHECKING:` imports do not)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "npukit"
MAX_LINES = 60
# NOTE: npukit/serving/ belongs to the serving work (issue 11), which lifts create_app's nested handlers to
# module level; remove this allowance when it has.
ALLOWED_LONG = ("serving/",)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in modules().values():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(ALLOWED_LONG):
            continue
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if n > MAX_LINES and "# NOTE: longer than 60 lines" not in body:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, ("split these (or say why not in a '# NOTE: longer than 60 lines because ...' inside them): "
                      + ", ".join(long))


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """npukit modules that `name` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in known:  # `from npukit.engine.llm import LLM` -> npukit.engine.llm
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from . import viz` imports the module npukit.viz
                found.add(resolve(f"{mod}.{alias.name}") if f"{mod}.{alias.name}" in known else resolve(mod))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(None)
    found.discard(name)
    return {m for m in found if m.startswith("npukit")}


def _parents(name: str) -> list[str]:
    """Importing npukit.engine.llm runs npukit/__init__ and npukit/engine/__init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycle_inside_npukit():
    mods = modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # NOTE: a package's __init__ that only re-exports lazily (module __getattr__) imports nothing here.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in _parents(node):
                continue  # a module importing its own package's names is not a cycle of modules
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
