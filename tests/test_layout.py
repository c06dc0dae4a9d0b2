"""The library's shape: imports run one way, modules stay readable, the wheel is self-contained,
and the command-line tools end a user's mistake with one line."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dpo_lib.config import REPO_ROOT

PACKAGE = REPO_ROOT / "dpo_lib"
MAX_LINES = 450


def internal_imports(path: Path) -> set[str]:
    """Modules of dpo_lib that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:               # from .x import y / from . import x
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("dpo_lib."):
                found.add(node.module.split(".")[1])
            elif node.module == "dpo_lib":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("dpo_lib."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    return {name: internal_imports(PACKAGE / f"{name}.py") & modules - {name} for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_walk_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "train" in internal_imports(PACKAGE / "sweep.py")          # a function-level import


def test_no_import_cycle_in_dpo_lib():
    graph = import_graph()
    assert len(graph) > 20 and graph["train"] and graph["packing"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_dependencies_run_one_way():
    """config -> data -> models -> log-probs -> forward -> reference -> steps -> train, then the
    GGUF check, then export (whose command line verifies its files with the GGUF check): no
    module reaches one later in the chain."""
    graph = import_graph()

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(n, b, seen + (a,)) for n in graph[a] if n not in seen)

    order = ["config", "hub", "data", "batches", "models", "logps", "packing", "forward",
             "reference", "ches", "steps", "runs", "train", "gguf_check", "export"]
    for lower, upper in zip(order, order[1:]):
        assert not reaches(lower, upper), f"{lower} depends on {upper}"
    assert not reaches("losses", "logps") and not reaches("logps", "losses")
    for analysis in ("analysis", "compare", "sweep", "memory", "llama_runtime"):
        assert not reaches(analysis, "export") and not reaches(analysis, "gguf_check"), analysis


def test_no_module_is_over_the_line_limit():
    long = {p.name: n for p in PACKAGE.glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def build_wheel(folder: Path) -> Path:
    """``pip wheel --no-deps .`` of a copy of the checkout (nothing is written into the repo)."""
    source = folder / "src"
    for item in ("pyproject.toml", "README.md", "LICENSE", "dpo_lib", "configs", "data/bundled",
                 "data/tiny-tokenizer"):
        target = source / item
        if (REPO_ROOT / item).is_dir():
            shutil.copytree(REPO_ROOT / item, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (REPO_ROOT / item).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / item, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", str(source), "-w", str(folder / "dist")], check=True,
                   capture_output=True, text=True, timeout=600)
    return next((folder / "dist").glob("dpo_quant-*.whl"))


def test_the_wheel_holds_the_profiles_and_data_and_loads_them_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for profile in ("tiny", "cpu", "gpu", "gpu-smoke"):
        assert f"dpo_lib/configs/{profile}.yaml" in names
    for data in ("bundled/train.jsonl", "bundled/test.jsonl", "tiny-tokenizer/tokenizer.json"):
        assert f"dpo_lib/data_files/{data}" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("dpo-train", "dpo-export", "dpo-chat", "dpo-app"):
        assert f"{script} = " in entry_points

    site = tmp_path / "site"               # a non-editable install, without dependencies
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import dpo_lib, dpo_lib.config as c; from dpo_lib.data import load_preference_pairs\n"
            "cfg = c.load_config('cpu'); pairs, _ = load_preference_pairs('bundled', 'test', 3)\n"
            "print(dpo_lib.__file__, c.IN_CHECKOUT, cfg.model.name, cfg.train.shared_prompt, "
            "len(pairs), c.RUNS_DIR)")
    env = {key: value for key, value in os.environ.items()
           if key not in ("DPO_PROFILE", "DPO_FIGURES_DIR")}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    where, in_checkout, model, shared, pairs, runs = done.stdout.split()
    assert Path(where).is_relative_to(site) and in_checkout == "False"
    assert (model, shared, pairs) == ("smollm2-135m-instruct", "True", "3")
    assert Path(runs) == elsewhere / "runs"
    assert list(elsewhere.iterdir()) == []                     # importing created no folder


def run_tool(module: str, *args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPO_PROGRESS": "0"}
    env.pop("DPO_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", f"dpo_lib.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["tiny", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["tiny", "stage=sftt"], "train.stage='sftt': choose sft or preference"),
    (["tiny", "data.max_length=abc"], "config key 'data.max_length' must be int"),
    (["no-such-profile"], "unknown profile 'no-such-profile'"),
])
def test_train_user_errors_are_one_line_and_exit_non_zero(args, message):
    done = run_tool("train", *args)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo-train: error: ") and message in lines[0]
    assert "Traceback" not in done.stderr


def test_a_data_file_with_no_usable_pairs_is_one_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"chosen": "no dialogue", "rejected": "at all"}\nnot json\n')
    done = run_tool("train", "tiny", f"data.source={bad}", "data.test_fraction=0.5",
                    f"output_dir={tmp_path / 'run'}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("dpo-train: error: no usable pairs in ")


def test_export_and_chat_user_errors_are_one_line(tmp_path):
    for module, args, message in [("export", [str(tmp_path / "missing")], "has no config.yaml"),
                                  ("chat", [str(tmp_path / "missing.gguf")], "missing.gguf")]:
        done = run_tool(module, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"dpo-{module}: error: ") and message in lines[0], lines[0]
