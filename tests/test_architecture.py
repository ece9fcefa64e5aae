"""The package's structure, checked from the source (no ComfyUI needed): front ends reach the
engine through the service layer only and never import each other; the core is host-free and
reads no ComfyUI structures; the ensemble modes are spelled in one module; importing a module
does nothing but define things."""
import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "afa_nodes"
MODE_STRINGS = ("block-wise average", "noise average", "fixed weights", "single model")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "node_helpers", "latent_preview"}
# What a front end may not import: the engine and its ComfyUI adapters sit below the service layer.
BELOW_SERVICE = {"afa_nodes.ensemble_model", "afa_nodes.comfy_unet", "afa_nodes.training_host",
                 "afa_nodes.core.ensemble", "afa_nodes.core.unet", "afa_nodes.core.layout", "afa_nodes.core.sabw",
                 "afa_nodes.core.train"}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def front_end(module: str):
    """'nodes' | 'cli' | 'studio' | None for a module of the package."""
    last = module.split(".")[-1]
    if module.startswith("afa_nodes.studio"):
        return "studio"
    if module.count(".") == 1 and (last == "nodes" or last.startswith("nodes_")):
        return "nodes"
    if module.count(".") == 1 and (last.startswith("cli_") or last == "__main__"):
        return "cli"
    return None


def imports(module: str, path: Path) -> set:
    """Absolute names of every module `path` imports (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_package_has_the_three_front_ends_and_the_service_layer():
    kinds = {front_end(m) for m, _ in modules()}
    assert {"nodes", "cli", "studio"} <= kinds
    assert (PACKAGE / "service" / "models.py").exists() and (PACKAGE / "service" / "sampling.py").exists()


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_front_ends_import_neither_each_other_nor_the_engine(module, path):
    kind = front_end(module)
    if kind is None:
        return
    for name in imports(module, path):
        other = front_end(name)
        assert other in (None, kind), f"{module} ({kind}) imports {name} ({other}): go through afa_nodes.service"
        assert not any(name == b or name.startswith(b + ".") for b in BELOW_SERVICE), \
            f"{module} ({kind}) imports {name}, below the service layer: call afa_nodes.service instead"


def test_the_service_layer_imports_no_front_end():
    for module, path in modules():
        if module.startswith("afa_nodes.service"):
            bad = [n for n in imports(module, path) if front_end(n)]
            assert not bad, f"{module} imports front ends {bad}"


def code_tokens(path: Path):
    """(kind, text) of every token that is code or a string, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    doc_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in doc_lines:
            yield tok.type, tok.string


def test_the_core_is_host_free_and_reads_no_transformer_options():
    for module, path in modules():
        if not module.startswith("afa_nodes.core"):
            continue
        top = {n.split(".")[0] for n in imports(module, path)}
        assert not top & COMFY_MODULES, f"{module} imports ComfyUI ({sorted(top & COMFY_MODULES)})"
        for kind, text in code_tokens(path):
            assert "transformer_options" not in text and "cond_or_uncond" not in text, \
                f"{module} reads ComfyUI's per-call options: the ComfyUI layer passes a StepContext"


def test_mode_strings_live_in_core_spec_only():
    for module, path in modules():
        if module == "afa_nodes.core.spec":
            continue
        for kind, text in code_tokens(path):
            if kind == tokenize.STRING:
                assert not any(m in text for m in MODE_STRINGS), \
                    f"{module} spells a mode ({text[:60]}): use afa_nodes.core.spec.Mode"


def test_mode_strings_are_where_the_test_looks():
    spec = PACKAGE / "core" / "spec.py"
    strings = [text for kind, text in code_tokens(spec) if kind == tokenize.STRING]
    assert all(any(m in s for s in strings) for m in MODE_STRINGS)


ALLOWED_AT_TOP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                  ast.AnnAssign)


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_importing_a_module_only_defines_things(module, path):
    """No registration or other work as a side effect of import: a bare call at module level
    (e.g. registering routes or folders) is refused; ComfyUI asks for registration itself."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ALLOWED_AT_TOP):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            continue  # `if __name__ == "__main__":`
        if isinstance(node, ast.Try) or isinstance(node, ast.If):
            assert all(isinstance(n, ALLOWED_AT_TOP + (ast.Pass, ast.If, ast.Try))
                       for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node), \
                f"{module}:{node.lineno} does work at import: {ast.unparse(node)[:80]}"
            continue
        raise AssertionError(f"{module}:{node.lineno} does work at import: {ast.unparse(node)[:80]}")
