"""The package's layout as docs/architecture.md states it: every module listed, imports only
downwards, one file name per module, defaults written once, commands imported on use."""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "embgeom"

# Lowest first; a module may import from its own layer and the layers before it.
LAYERS = [
    {"formatting", "tables", "numerics", "validation", "api_types", "io", "models", "progress", "interrupts", "threads",
     "provenance"},
    {"results"},
    {"engine"},
    {"reference"},
    {"backends", "kernels"},
    {"api", "distributed"},
    {"neighbours", "pair_shards"},
    {"index"},
    {"community_detection"},
    {"compat", "sklearn", "faiss"},
    {"analysis.run_checkpoint"},
    {"analysis.text", "analysis.heads", "analysis.clouds"},
    {"analysis.syntax", "analysis.vocab"},
    {"report"},
    {"commands"},
    {"info", "cli", "__main__", "embgeom"},
]


def _group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "embgeom"
    if parts[1] == "analysis" and len(parts) > 2:
        return "analysis." + parts[2]
    return parts[1]


def _layer(group: str) -> int:
    for i, groups in enumerate(LAYERS):
        if group in groups:
            return i
    raise AssertionError(f"{group}: not in LAYERS (add it, and to docs/architecture.md)")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "embgeom":
                continue
            for alias in node.names:  # `from . import x` names a module x when one exists
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in _modules() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "embgeom"}
    return found


def test_no_import_runs_up_a_layer():
    wrong = []
    for module, path in _modules().items():
        for target in _imports(module, path):
            if target.startswith("embgeom._"):  # compiled modules (_C, _cuda): the bottom
                continue
            if _layer(_group(target)) > _layer(_group(module)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(sorted(wrong))


def _documented_modules() -> set[str]:
    """The module tree of docs/architecture.md's Layers block (2 spaces per level)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    out = set()
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 8) and not line.strip().split()[0].endswith((".py", "/")):
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0].rstrip(",")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([p for _, p in stack] + [name.rstrip("/")])
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
        elif name.endswith(".py"):
            out.add(path)
    return {p for p in out if p.startswith("python/embgeom/")}


def test_architecture_doc_lists_every_module():
    actual = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    documented = {"python/" + p if not p.startswith("python/") else p for p in _documented_modules()}
    assert actual - documented == set(), "modules missing from docs/architecture.md"
    assert documented - actual == set(), "docs/architecture.md lists modules that do not exist"


def test_architecture_doc_names_every_native_kernel_and_benchmark_file():
    """Every file of csrc/, kernels/ and benchmarks/ is named in the Layers block (a header by
    itself or by its .cpp; bench_<area>.py and results/ by their patterns)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w.-]+\.(?:h|cpp|cu|py|sh)\b", block))
    files = subprocess.run(["git", "ls-files", "csrc", "kernels", "benchmarks"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    missing = [f for f in files
               if not f.startswith("benchmarks/results/") and Path(f).name != "__init__.py"
               and not re.fullmatch(r"benchmarks/bench_\w+\.py", f)
               and Path(f).name not in named and Path(f).with_suffix(".cpp").name not in named]
    assert missing == [], "files not named in docs/architecture.md's Layers block"


def test_one_file_name_per_module():
    names: dict[str, list[str]] = {}
    for path in PKG.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PKG)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_defaults_come_from_the_config():
    import embgeom
    from embgeom.cli import build_parser
    from embgeom.engine.config import DEFAULTS, user_options

    sig = inspect.signature(embgeom.pairwise_stats).parameters
    options = user_options()
    for name, spec in options.items():
        assert sig[name].default == spec["default"], name
    args = build_parser(["pairs", "x.npy", "--json", "o.json"]).parse_args(["pairs", "x.npy", "--json", "o.json"])
    for name, spec in options.items():
        # an option that sizes another (near_k: near) is None until given; main() fills the default in
        assert getattr(args, name) == (None if "needs" in spec else spec["default"]), name
    assert DEFAULTS.describe()["bins"] == options["bins"]["default"]


def test_no_pairwise_default_in_the_cpp_signatures():
    """The binding passes every option explicitly (defaults live in engine/config.py only)."""
    import numpy as np

    from embgeom.backends.registry import cpp

    if cpp() is None:
        pytest.skip("embgeom._C is not built")
    with pytest.raises(TypeError):
        cpp().PairwiseEngine(np.ones((2, 2), np.float32), None)
    src = (ROOT / "csrc" / "bindings.cpp").read_text()
    engine_args = src.split('py::arg("x"), py::arg("y")', 1)[1].split(".def(", 1)[0]
    assert ") = " not in engine_args


def test_a_command_imports_only_its_own_module():
    """(and the shared flags of commands/model_options.py)"""
    code = ("import sys; from embgeom.cli import build_parser; build_parser(['pairs', '--help'][:1]); "
            "print(sorted(m for m in sys.modules if m.startswith('embgeom.commands.') "
            "and m != 'embgeom.commands.model_options' or m in ('transformers', 'matplotlib', 'faiss')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['embgeom.commands.pairs']"


def test_top_level_kernels_folder_does_not_hide_a_kernels_package(tmp_path):
    """kernels/ has no __init__.py: from the repository root (sys.path[0] of `python -m` and
    `python -c`) a regular package named `kernels` later on the path still wins. transformers
    >= 5.25 imports the PyPI package `kernels`; our folder used to shadow it and every model
    load failed."""
    import os

    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("MARK = 'the installed package'\n")
    code = "import kernels; print(kernels.MARK)"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "the installed package", out.stderr[-1000:]
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_kernels_have_one_import_name_from_this_tree():
    """embgeom.kernels is the top-level kernels/ folder of the tree embgeom came from, also on
    PYTHONPATH=python beside another install (no link, no `import kernels`)."""
    import os

    code = "import embgeom.kernels.triton.pairwise as p; print(p.__file__)"
    env = dict(os.environ, PYTHONPATH=str(PKG.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd="/").stdout
    assert Path(out.strip()).resolve() == (ROOT / "kernels" / "triton" / "pairwise.py").resolve()
    for path in list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) kernels\b", text, re.M), path


def test_sdist_carries_what_the_build_compiles(tmp_path):
    # without a MANIFEST.in the sdist held no csrc/ and no CMakeLists.txt: pip could not build it
    import tarfile

    tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "CMakeLists.txt"], cwd=ROOT, capture_output=True,
                             text=True)
    if tracked.returncode != 0 or not tracked.stdout:
        pytest.skip("not a git checkout")
    built = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    name = built.stdout.split()[-1]
    with tarfile.open(tmp_path / name) as tar:
        held = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    missing = sorted(set(tracked.stdout.split()) - held)
    assert not missing, missing


def test_readme_synopsis_names_every_flag_of_every_command():
    """The README's command-line synopsis lists every option each command's --help has (a probe
    found ten flags, --row-bottomk to --ef-search, that no page named)."""
    from embgeom.cli import build_parser
    from embgeom.commands import COMMANDS

    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("## Command line"):]
    synopsis = synopsis[:synopsis.index("```", synopsis.index("```") + 3)]
    missing = []
    for name in COMMANDS:
        if name == "info":
            continue
        sub = next(a for a in build_parser([name])._actions if a.dest == "command").choices[name]
        for action in sub._actions:
            flags = [f for f in action.option_strings if f.startswith("--")]
            if not flags or flags[0] in ("--help", "--no-progress", "--quiet", "--progress"):  # (said once for all)
                continue
            # the command's lines: `embgeom NAME ...` and its continuations, or `torchrun ... -m embgeom NAME ...`
            lines = re.compile(rf"^(?:embgeom|torchrun .*?-m embgeom) {re.escape(name)} .*?(?=^embgeom |^\(|^torchrun|\Z)",
                               re.M | re.S)
            if not any(re.search(rf"{re.escape(flags[0])}\b", b) for b in lines.findall(synopsis)):
                missing.append(f"{name} {flags[0]}")
    assert not missing, missing
