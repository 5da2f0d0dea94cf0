"""Tests of the package as a whole: its import graph, where architecture facts live, its docs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tli"
#: Modules that render saved results; they never import the pipeline.
RENDERING = {"tli.tables", "tli.plots", "tli.report", "tli.card"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the tli modules it imports anywhere (function bodies too; not TYPE_CHECKING)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tli"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tli"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_none_where_there_is_none():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"tli.scan", "tli.plots", "tli.pipeline.runner", "tli.cli.run"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_rendering_modules_never_import_the_pipeline_or_the_cli():
    graph = import_graph()
    for module in RENDERING:
        bad = {d for d in graph[module] if d.startswith(("tli.pipeline", "tli.cli"))}
        assert not bad, (module, bad)


def test_only_the_cli_and_the_config_glue_import_argparse():
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        if name.startswith("tli.cli") or name == "tli.config":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "argparse" not in imported, name


#: Attributes that differ between architectures (GPT-2's n_embd and Conv1D nf, Gemma's and
#: Mistral's sliding_window, hidden_size): read through tli.surgery only.
ARCHITECTURE_ATTRIBUTE = re.compile(
    r"(?<!surgery)\.(n_embd|sliding_window|hidden_size|nf)\b"
    r"|(getattr|hasattr)\([^)]*[\"'](n_embd|sliding_window|hidden_size|nf)[\"']"
)


def test_the_attribute_pattern_catches_what_it_should():
    for code in ("config.n_embd", "m.nf", 'getattr(c, "hidden_size", 0)', 'hasattr(m, "nf")',
                 "text.sliding_window"):  # fmt: skip
        assert ARCHITECTURE_ATTRIBUTE.search(code), code
    for code in ("surgery.hidden_size(model)", '"hidden_size": 32', "self.nfo"):
        assert not ARCHITECTURE_ATTRIBUTE.search(code), code


def test_only_surgery_names_architecture_attributes():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "surgery.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not ARCHITECTURE_ATTRIBUTE.search(code), f"{path.name}:{number}: {line.strip()}"


def test_source_and_docs_cite_only_files_in_the_repository():
    """The facts the code and docs rely on live in docs/design.md, not in a team-only file."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    for path in files:
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for path in files:
        for fact in re.findall(r"docs/design\.md, fact (\d+)", path.read_text(encoding="utf-8")):
            assert f"\n{fact}. **" in design, (path, fact)


# --- safety -----------------------------------------------------------------------------------

SOURCES = sorted(PACKAGE.rglob("*.py"))


def _code_lines():
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(ROOT)}:{number}", code


def test_weights_are_read_only_through_safetensors_or_weights_only():
    for where, code in _code_lines():
        if "torch.load(" in code:
            assert "weights_only=True" in code, where
        assert not re.search(r"\bpickle\b|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True", code), where
        assert not re.search(r"weights_only\s*=\s*False", code), where


def test_no_user_string_reaches_a_shell():
    for where, code in _code_lines():
        assert "shell=True" not in code, where
        assert not re.search(r"\bos\.(system|popen|exec\w*|spawn\w*)\(", code), where
        assert not re.search(r"(?<![.\w])(eval|exec)\(", code), where
        if re.search(r"subprocess\.(run|Popen|call|check_output|check_call)\(", code):
            assert re.search(r"\(\s*\[|\(\s*$|\(cmd|\(argv|\(command", code), where


def test_trust_remote_code_is_off_unless_a_flag_says_so(monkeypatch, tiny_model_dir):
    import transformers

    from tli.cli import build_parser
    from tli.models import ModelConfig, load_model

    assert ModelConfig().trust_remote_code is False
    for where, code in _code_lines():
        assert "trust_remote_code=True" not in code, where
    seen = []
    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls_name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for flag in (False, True):
        seen.clear()
        load_model(ModelConfig(name=str(tiny_model_dir), trust_remote_code=flag))
        assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
        assert all(value is flag for _, value in seen), seen
    parser = build_parser()
    for argv in (["embed", "x"], ["scan"], ["train"], ["evaluate", "--adapter", "a"]):
        args = parser.parse_args(argv)
        assert getattr(args, "trust_remote_code", False) is False, argv
        with_flag = parser.parse_args([*argv, "--trust-remote-code"])
        assert with_flag.trust_remote_code is True, argv
