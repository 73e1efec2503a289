"""What type checkers see of embgeom (it ships py.typed): a user's correct script checks clean
with mypy, wrong uses are reported (the names are typed, not Any), and the lazy top-level names
have the TYPE_CHECKING imports that give checkers their real types."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USAGE = ROOT / "tests" / "typing_usage.py"

# each line is a wrong use mypy must report (embgeom's names typed, not Any)
WRONG = '''\
import numpy as np
import embgeom
x = np.zeros((4, 3), np.float32)
count: str = embgeom.pairwise_stats(x).count
embgeom.Index(x).search(x, "3")
embgeom.pairs_above(x, "0.9", "out")
embgeom.faiss.IndexFlatIP(3).range_search(x, "0.5")
'''


def test_a_users_script_type_checks_and_wrong_uses_are_reported(tmp_path):
    pytest.importorskip("mypy", reason="mypy is installed by `make install`")
    wrong = tmp_path / "wrong_usage.py"
    wrong.write_text(WRONG)
    env = {**os.environ, "MYPYPATH": str(ROOT / "python")}
    run = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", sys.executable,
                          "--cache-dir", str(tmp_path / "cache"), "--follow-imports=silent",
                          "--ignore-missing-imports", "--no-error-summary", "--hide-error-context",
                          str(USAGE), str(wrong)], capture_output=True, text=True, env=env, timeout=900)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if USAGE.name in e], run.stdout
    lines = sorted({int(e.split(":")[1]) for e in errors if wrong.name in e})
    assert lines == [4, 5, 6, 7], run.stdout + run.stderr


def test_the_typed_usage_runs():
    spec = importlib.util.spec_from_file_location("typing_usage", USAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


def test_lazy_names_have_type_checking_imports_and_py_typed_ships():
    tree = ast.parse((ROOT / "python" / "embgeom" / "__init__.py").read_text())
    lazy, drop_ins, typed = set(), set(), set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "_EXPORTS":
                lazy = set(ast.literal_eval(node.value))
            elif node.targets[0].id == "_DROP_INS":
                drop_ins = set(ast.literal_eval(node.value))
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                # `X as X`: a re-export type checkers accept from a py.typed package
                typed |= {a.name for a in imp.names if a.asname == a.name}
    assert lazy and typed == lazy | drop_ins
    import embgeom

    assert set(embgeom.__all__) - {"__version__"} == lazy
    assert (ROOT / "python" / "embgeom" / "py.typed").is_file()
    assert '"embgeom": ["py.typed"]' in (ROOT / "setup.py").read_text()


def test_annotations_resolve_at_run_time():
    """typing.get_type_hints on every public name, its methods and the drop-ins' (what typeguard,
    beartype, pydantic and sphinx read): the annotations' names are importable at run time (the
    first typed release had left some to type checkers only: NameError)."""
    import inspect
    import typing

    import embgeom
    from embgeom import faiss, sklearn
    from embgeom.compat import sentence_transformers

    objects = [getattr(embgeom, name) for name in embgeom.__all__ if name != "__version__"]
    objects += [sentence_transformers.semantic_search, sentence_transformers.paraphrase_mining_embeddings,
                sentence_transformers.community_detection, faiss.IndexFlatIP, sklearn.NearestNeighbors]
    checked = 0
    for obj in objects:
        members = [obj] + ([m for n, m in inspect.getmembers(obj, inspect.isfunction) if not n.startswith("_")
                            or n == "__init__"] if inspect.isclass(obj) else [])
        for member in members:
            typing.get_type_hints(member)
            checked += 1
    assert checked > 60
