"""The integration package's import graph: acyclic, and no module reaches into another's private
names. Read from the source with ``ast`` (imports inside functions count too)."""
import ast
import pathlib

import pytest

import softprompt.integration

PACKAGE = pathlib.Path(softprompt.integration.__file__).parent
PREFIX = "softprompt.integration."


def _modules():
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def _imports(tree):
    """``[(imported module, [names], lineno)]`` for imports of this package's modules."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:            # from . import x, y
                out.extend((a.name, [], node.lineno) for a in node.names)
            elif node.level == 1:
                out.append((node.module.split(".")[0], [a.name for a in node.names], node.lineno))
            elif node.level == 0 and (node.module or "").startswith(PREFIX):
                out.append((node.module[len(PREFIX):].split(".")[0], [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name[len(PREFIX):].split(".")[0], [], node.lineno)
                       for a in node.names if a.name.startswith(PREFIX))
    return out


def _graph():
    modules = _modules()
    return {name: {m for m, _, _ in _imports(tree) if m in modules and m != "__init__"}
            for name, tree in modules.items()}


def _cycle(graph):
    """A cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_is_acyclic():
    graph = _graph()
    assert {"attach", "encdec", "families", "store"} <= set(graph)     # the parser sees the package
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_families_imports_no_adapter():
    assert _graph()["families"] == set()


def test_no_module_imports_private_names_of_another():
    private = [f"{name}.py:{line}: from {module} import {n}"
               for name, tree in _modules().items() for module, names, line in _imports(tree)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


@pytest.mark.parametrize("family, adapter", [("t5", "EncoderDecoderAdapter"), ("bart", "EncoderDecoderAdapter"),
                                             ("llama", "DecoderAdapter"), ("gpt2", "DecoderAdapter")])
def test_attach_picks_the_adapter_of_the_model_kind(family, adapter):
    from softprompt.integration.attach import adapter_for

    class Config:
        model_type = family

    class Model:
        config = Config()

    assert adapter_for(Model()).__name__ == adapter
