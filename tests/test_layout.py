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

from dpo_lib.core.config import REPO_ROOT

PACKAGE = REPO_ROOT / "dpo_lib"
MAX_LINES = 450
WINGS = ("core", "training", "deploy", "lessons")
#: Which wings each wing may import (besides itself): core nothing, training and deploy only core,
#: the lessons anything.
MAY_IMPORT = {"core": set(), "training": {"core"}, "deploy": {"core"},
              "lessons": {"core", "training", "deploy"}}


def module_name(path: Path) -> str:
    """``wing.module`` for ``dpo_lib/wing/module.py``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def internal_imports(path: Path) -> set[str]:
    """Modules of dpo_lib (``wing.module``) that ``path`` imports anywhere, top level or inside
    functions, by relative or absolute import."""
    here = module_name(path).split(".")[:-1]            # the importing module's package parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("dpo_lib"):
                parts = node.module.split(".")[1:]
            else:
                continue
            if len(parts) >= 2:
                found.add(".".join(parts[:2]))
            elif len(parts) == 1:                        # from .wing import module, ...
                found.update(f"{parts[0]}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(alias.name.split(".")[1:3]) for alias in node.names
                         if alias.name.startswith("dpo_lib.") and alias.name.count(".") >= 2)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p) for wing in WINGS for p in (PACKAGE / wing).glob("*.py")
               if p.stem != "__init__"}
    return {name: internal_imports(PACKAGE / f"{name.replace('.', '/')}.py") & modules - {name}
            for name in modules}


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
    assert "training.train" in internal_imports(PACKAGE / "training" / "sweep.py")  # in a function
    assert "core.config" in internal_imports(PACKAGE / "training" / "train.py")    # ..core.config
    assert "core.layouts" in internal_imports(PACKAGE / "training" / "step.py")


def test_no_import_cycle_in_dpo_lib():
    graph = import_graph()
    assert len(graph) > 30 and graph["training.train"] and graph["core.layouts"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_module_lives_in_a_wing():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(WINGS)


def wing_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items()
                  for target in targets
                  if target.split(".")[0] != module.split(".")[0]
                  and target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]])


def test_wings_depend_one_way():
    """core imports no other wing; training and deploy only core (deploy needs a finished run
    folder, never the trainer); lessons may import anything."""
    assert wing_violations(import_graph()) == []
    # the check itself catches a wrong import
    assert wing_violations({"core.models": {"lessons.bundled"}, "deploy.x": {"training.train"},
                            "lessons.y": {"training.train"}}) == \
        ["core.models imports lessons.bundled", "deploy.x imports training.train"]


def test_dependencies_run_one_way_within_core():
    """A pair's way down the core wing: config -> data -> batches -> logps -> layouts -> scoring,
    then losses, and the training wing's reference -> step -> train: no module reaches one later
    in the chain."""
    graph = import_graph()

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(n, b, seen + (a,)) for n in graph[a] if n not in seen)

    order = ["core.config", "core.hub", "core.data", "core.batches", "core.logps",
             "core.layouts", "core.scoring", "training.reference", "training.step",
             "training.train"]
    for lower, upper in zip(order, order[1:]):
        assert not reaches(lower, upper), f"{lower} depends on {upper}"
    assert not reaches("core.losses", "core.logps") and not reaches("core.logps", "core.losses")
    assert not reaches("core.models", "core.layouts")


def test_no_module_is_over_the_line_limit():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
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
    code = ("import dpo_lib, dpo_lib.core.config as c; from dpo_lib.core.data import load_preference_pairs\n"
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


WING_OF_TOOL = {"train": "training", "sweep": "training", "export": "deploy", "chat": "deploy",
                "app": "deploy", "compare": "lessons"}


def run_tool(module: str, *args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPO_PROGRESS": "0"}
    env.pop("DPO_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", f"dpo_lib.{WING_OF_TOOL[module]}.{module}", *args],
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["tiny", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["tiny", "stage=sftt"], "config key 'train.stage' must be one of sft, preference; got 'sftt'"),
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


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    """The command-line tools' ending (dpo_lib.core.cli): a UserError (ConfigError,
    DataError, ...) is one line and exit 1; any other exception, a ValueError included, is a bug
    and propagates with its traceback."""
    from dpo_lib.core.cli import command
    from dpo_lib.core.errors import ConfigError, DataError, MissingFileError

    for error in (ConfigError("bad value\nsecond line"), DataError("no pairs"),
                  MissingFileError("no such run")):
        def main(argv=None, error=error):
            raise error
        assert command("dpo-x")(main)([]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"dpo-x: error: {' '.join(str(error).split())}"]

    def buggy(argv=None):
        return {}["missing"] + int("x")
    with pytest.raises(KeyError):
        command("dpo-x")(buggy)([])
    with pytest.raises(ValueError, match="invalid literal"):
        command("dpo-x")(lambda argv=None: int("x"))([])


def test_a_bug_in_a_tool_prints_its_traceback(tmp_path):
    """End to end: a ValueError from inside the trainer (not a user's mistake) is not turned into
    a one-line "error"; python shows the traceback and exits non-zero."""
    code = ("import sys; from dpo_lib.training import train as t\n"
            "from dpo_lib.core import layouts\n"
            "def broken(self, examples, pad): raise ValueError('a bug, not a user error')\n"
            "layouts.SequenceLayout.collate = broken\n"
            f"sys.exit(t.main(['tiny', 'sft_steps=1', 'train_limit=8', 'test_limit=8', "
            f"'eval_every=0', 'save_every=0', 'output_dir={tmp_path / 'run'}', '--no-progress']))")
    env = {**os.environ, "DPO_PROGRESS": "0", "DPO_CACHE": str(tmp_path / "cache")}
    env.pop("DPO_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: a bug, not a user error" in done.stderr
    assert "dpo-train: error:" not in done.stderr


def test_a_pairs_path_from_the_file_to_the_loss_enters_each_module_once():
    """benchmarks/pair_path.py follows one pair through the trainer's own functions, call by
    call: it reads (data), is tokenized and batched (batches), meets its cached reference
    (reference), is collated and run (layouts), scored (logps) and turned into a loss (losses),
    each module entered once, in that order."""
    env = {**os.environ, "DPO_PROGRESS": "0"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "pair_path.py")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    path, counts = done.stdout.strip().splitlines()[-2:]
    assert path == "data -> batches -> reference -> layouts -> logps -> losses", path
    assert counts.endswith("re-entries into a module already left: 0"), counts
