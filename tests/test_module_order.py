"""The module reads in the notebooks' order: no top-level name is used before the place it is defined."""

import ast
from pathlib import Path

import gridjepa_utils as gj


class _Uses(ast.NodeVisitor):
    """Names a top-level statement uses, annotations left out (they are strings under `from __future__`)."""

    def __init__(self):
        self.names = []

    def visit_Name(self, node):
        self.names.append((node.id, node.lineno))

    def visit_arguments(self, node):
        for default in node.defaults + [d for d in node.kw_defaults if d is not None]:
            self.visit(default)

    def visit_FunctionDef(self, node):
        for child in node.decorator_list + [node.args] + node.body:
            self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        for child in (node.target, node.value):
            if child is not None:
                self.visit(child)


def test_no_part_refers_to_a_later_one():
    tree = ast.parse(Path(gj.__file__).read_text())
    defined = {}  # name -> index of the top-level statement that defines it
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, i)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, i)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.setdefault(node.target.id, i)
    forward = []
    for i, node in enumerate(tree.body):
        uses = _Uses()
        uses.visit(node)
        forward += [f"line {line}: {name}" for name, line in uses.names if defined.get(name, -1) > i]
    assert not forward, "used before their definition: " + ", ".join(sorted(set(forward)))
