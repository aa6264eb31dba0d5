"""The package's import graph is layered: no cycles, no module importing one above it.

``LAYERS`` is the map of the house, bottom first. A module may import modules of
lower layers only (not its own layer, not a higher one). Imports are read from
the source (``ast``), at module level and inside functions alike, together with
``importlib.import_module("literal")`` calls: a function-level import that goes
upward is still a cycle, it only shows later, at the first call.

A new module must be given a layer here; that is the point of the list. Run the
file as a script to print the graph (``python tests/test_layering.py``).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prsl_kernels", "reference")

# Bottom first. Within a line, modules are peers and may not import each other.
LAYERS = [
    # constants of the spec and the checks of the public arguments
    ["prsl_kernels.spec"],
    ["prsl_kernels.validation", "prsl_kernels.ops", "prsl_kernels.triton_interpreter", "reference"],
    # the kernels behind prsl::forward / backward / forward_grad, then the choice among them
    ["prsl_kernels.triton_kernels", "prsl_kernels.cpp_kernels"],
    ["prsl_kernels.backends"],
    ["prsl_kernels.function"],
    # the public loss: the vocab-parallel dispatch sits below the entry points that call it
    ["prsl_kernels.vocab_parallel"],
    ["prsl_kernels.loss"],
    ["prsl_kernels.linear"],
    ["prsl_kernels"],
    # Hugging Face: token losses, the model patch, its face and TRL's trainer
    ["prsl_kernels.hf_losses"],
    ["prsl_kernels.hf_patch"],
    ["prsl_kernels.hf", "prsl_kernels.sft"],
    # the drivers: data, statistics and the CLI's shared set-up first, then the models and the
    # metrics, the attack and fine-tuning, and the studies, their dispatcher (prsl-study) last
    ["prsl_kernels.drivers", "prsl_kernels.drivers.data", "prsl_kernels.drivers.distributed",
     "prsl_kernels.drivers.attack_steps", "prsl_kernels.drivers.stats", "prsl_kernels.drivers.cli"],
    ["prsl_kernels.drivers.metrics", "prsl_kernels.drivers.tables", "prsl_kernels.drivers.models"],
    ["prsl_kernels.drivers.chat_models", "prsl_kernels.drivers.report"],
    ["prsl_kernels.drivers.checkpoints"],
    ["prsl_kernels.drivers.attack", "prsl_kernels.drivers.finetune"],
    ["prsl_kernels.drivers.demo", "prsl_kernels.drivers.study_report", "prsl_kernels.drivers.study_jobs",
     "prsl_kernels.drivers.study_mechanism_report"],
    ["prsl_kernels.drivers.study_dose", "prsl_kernels.drivers.study_mechanism_attacks"],
    ["prsl_kernels.drivers.study_mechanism"],
    ["prsl_kernels.drivers.study"],
]


def modules():
    """``{dotted name: path}`` of every module of the packages, from the source tree."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _source(node, package):
    """The absolute module name an ``ast.ImportFrom`` reads from (``from ..x import y`` in
    ``package``)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def imports_of(name, path, known):
    """The known modules that ``name`` imports anywhere in its source.

    ``from pkg import sub`` counts as importing ``pkg.sub`` when ``sub`` is a module
    (else as importing ``pkg``): ``from . import ops`` needs ``ops``, not the package face.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _source(node, package)
            subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
            targets = subs or [source]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            # "import a.b.c" needs a.b.c; keep the longest known prefix
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def private_imports(name, path, known):
    """``(module, source, name)`` for each ``_private`` name imported from another module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _source(node, package)
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((name, source, alias.name))
    return found


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def rank():
    return {module: level for level, layer in enumerate(LAYERS) for module in layer}


def test_every_module_has_a_layer():
    listed = rank()
    assert sorted(set(modules()) - set(listed)) == [], "modules missing from LAYERS"
    assert sorted(set(listed) - set(modules())) == [], "LAYERS lists modules that do not exist"


def test_imports_go_only_down():
    level = rank()
    upward = [f"{a} (layer {level[a]}) imports {b} (layer {level[b]})"
              for a, targets in graph().items() for b in sorted(targets) if level[b] >= level[a]]
    assert upward == [], "\n".join(upward)


def test_no_cycles():
    # implied by the layering, but reported as cycles, which reads better when one appears
    edges = graph()
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "\n".join(cycles)


def test_no_private_names_across_modules():
    known = modules()
    found = [f"{m} imports {s}.{n}" for name, path in known.items() for m, s, n in private_imports(name, path, known)]
    assert found == [], "\n".join(found)


def test_the_analysis_sees_function_level_and_relative_imports(tmp_path):
    # the checks above are only as good as this reader: it must catch the forms a cycle hides in
    source = ("from . import b\nfrom .c import thing\nimport pkg.d.e\n"
              "def f():\n    from .f import g\n    import importlib\n    importlib.import_module('pkg.h')\n")
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {f"pkg.{m}": None for m in "abcdfgh"} | {"pkg.d.e": None}
    assert imports_of("pkg.a", path, known) == {"pkg.b", "pkg.c", "pkg.d.e", "pkg.f", "pkg.h"}


if __name__ == "__main__":
    level = rank()
    for name, targets in sorted(graph().items(), key=lambda item: (level.get(item[0], -1), item[0])):
        print(f"[{level.get(name, '?')}] {name} -> {', '.join(sorted(targets)) or '-'}")
    sys.exit(0)
