"""The GPU CI pieces that CPU can check: the wheel preparation for the lent GPU machine, the
one-call script gpu-run (its parts and caps, its logs and summary, with a stand-in Python), the
workflow file, the make target's clear failure without CUDA, nbval's skip of notebook 08."""
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import yaml

from dpo_lib.core.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("gpu_wheels", REPO_ROOT / ".ci" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def fake_bitsandbytes_wheel(folder, libraries):
    """A wheel shaped like bitsandbytes': Python files, a native library per backend, RECORD."""
    wheel = folder / "bitsandbytes-0.0.1-py3-none-manylinux_2_24_x86_64.whl"
    files = {"bitsandbytes/__init__.py": b"x = 1\n",
             "bitsandbytes-0.0.1.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0.1\n",
             "bitsandbytes-0.0.1.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-manylinux_2_24_x86_64\n"}
    files.update({f"bitsandbytes/libbitsandbytes_{lib}.so": bytes(range(256)) * 400
                  for lib in libraries})
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("bitsandbytes-0.0.1.dist-info/RECORD",
                         "".join(gpu_wheels._record_line(n, d) + "\n" for n, d in files.items()))
    return wheel


def test_slim_wheel_keeps_cpu_and_cuda13_and_a_valid_record(tmp_path):
    wheel = fake_bitsandbytes_wheel(tmp_path, ["cpu", "cuda118", "cuda128", "cuda130", "cuda132",
                                               "rocm70", "xpu2025"])
    size = wheel.stat().st_size
    saved, dropped = gpu_wheels.slim_wheel(wheel)
    assert sorted(n.split("_", 1)[1] for n in dropped) == [
        "cuda118.so", "cuda128.so", "rocm70.so", "xpu2025.so"]
    assert saved == size - wheel.stat().st_size > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.0.1.dist-info/RECORD").decode().splitlines()
        # Every file but RECORD is listed with its true hash and size; nothing dropped is.
        listed = {line.split(",")[0]: line for line in record}
        assert set(listed) == names
        for name in names - {"bitsandbytes-0.0.1.dist-info/RECORD"}:
            assert listed[name] == gpu_wheels._record_line(name, archive.read(name))
    assert {"bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_cuda132.so"} <= names


def test_slimmed_wheel_installs_with_pip(tmp_path):
    wheel = fake_bitsandbytes_wheel(tmp_path, ["cpu", "cuda121", "cuda130"])
    gpu_wheels.slim_wheel(wheel)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(tmp_path / "site"), str(wheel)], check=True)
    installed = sorted(p.name for p in (tmp_path / "site" / "bitsandbytes").glob("*.so"))
    assert installed == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]


def test_slim_wheel_refuses_to_drop_every_library(tmp_path):
    wheel = fake_bitsandbytes_wheel(tmp_path, ["cuda118", "rocm70"])
    with pytest.raises(ValueError, match="no native library"):
        gpu_wheels.slim_wheel(wheel)


def test_budget_counts_the_working_tree_and_everything_carried(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"\0" * 3000)
    (tmp_path / "b.whl").write_bytes(b"\0" * 1000)
    assert gpu_wheels.check_budget(tmp_path, tree_bytes=500, limit=5000) == 4500
    with pytest.raises(SystemExit, match=r"over the 0 MiB.*largest wheels: a.whl"):
        gpu_wheels.check_budget(tmp_path, tree_bytes=1500, limit=4000)
    # the hh-rlhf file and the packed converter travel too
    (tmp_path / "hh-rlhf").mkdir()
    (tmp_path / "hh-rlhf" / "harmless-base-test.jsonl.gz").write_bytes(b"\0" * 200)
    (tmp_path / "llama.cpp-0.3.36.tar.gz").write_bytes(b"\0" * 100)
    assert gpu_wheels.check_budget(tmp_path, tree_bytes=500, limit=5000) == 4800
    assert 0 < gpu_wheels.working_tree_bytes() < gpu_wheels.CARRY_LIMIT


def test_missing_packages_are_the_closure_of_what_the_image_lacks():
    lacking = gpu_wheels.missing_distributions(roots=gpu_wheels.ROOTS, carry=())
    assert {"bitsandbytes", "datasets", "gguf", "nbval", "ipykernel", "jupyter-client",
            "pyzmq", "dill", "multiprocess", "trl"} <= set(lacking)
    assert not {"torch", "transformers", "peft", "numpy", "pandas", "pytest"} & set(lacking)
    # Only what this environment needs on Python 3.12: no backports for older Pythons.
    assert "exceptiongroup" not in lacking and "tomli" not in lacking
    specs = gpu_wheels.pinned(lacking)
    assert len(specs) == len(lacking) and all("==" in s for s in specs)


def test_the_wheels_carry_the_project_versions_of_what_the_image_has_older():
    """transformers, tokenizers, huggingface_hub, peft, accelerate and safetensors at this
    environment's versions (the image's are older), with what they need that the image lacks
    (transformers' kernels, huggingface_hub's httpx2), besides what the image lacks; debugpy and
    jedi left out. Nothing is downloaded: the list alone."""
    specs = gpu_wheels.wheel_specs()
    pinned = dict(spec.split("==") for spec in specs)
    for name in ("transformers", "tokenizers", "huggingface-hub", "peft", "accelerate",
                 "safetensors", "bitsandbytes", "datasets", "gguf", "nbval", "ipykernel", "trl"):
        assert pinned[name] == importlib.metadata.version(name), name
    assert {"kernels", "httpx2"} <= set(pinned)
    assert not {"debugpy", "jedi", "parso", "torch", "numpy", "pandas", "pytest"} & set(pinned)
    listed = subprocess.run([sys.executable, str(REPO_ROOT / ".ci" / "gpu_wheels.py"), "--list"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == specs


def fake_llama_wheel(folder):
    """A wheel shaped like llama-cpp-python's: each library as .so, .so.0 and .so.0.N.M, in the
    package and again in a top-level lib/, with include/ and bin/."""
    wheel = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    info = "llama_cpp_python-0.3.36.dist-info"
    files = {"llama_cpp/__init__.py": b"__version__ = '0.3.36'\n",
             "llama_cpp/llama.py": b"x = 1\n",
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n",
             "include/llama.h": b"/* header */\n", "bin/llama-cli": b"\x7fELF"}
    for lib, version in (("libllama", "0.5.0"), ("libggml-base", "0.25.3")):
        for prefix in ("llama_cpp/lib/", "lib/"):
            for name in (f"{lib}.so", f"{lib}.so.0", f"{lib}.so.{version}"):
                files[prefix + name] = bytes(range(256)) * 50
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD",
                         "".join(gpu_wheels._record_line(n, d) + "\n" for n, d in files.items()))
    return wheel


def test_slim_llama_wheel_keeps_the_package_libraries_by_name_and_soname(tmp_path):
    wheel = fake_llama_wheel(tmp_path)
    saved, dropped = gpu_wheels.slim_llama_wheel(wheel)
    assert saved > 0 and len(dropped) == 10
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {n for n in names if "/lib/" in n} == {
        "llama_cpp/lib/libllama.so", "llama_cpp/lib/libllama.so.0",
        "llama_cpp/lib/libggml-base.so", "llama_cpp/lib/libggml-base.so.0"}
    assert not any(n.startswith(("lib/", "include/", "bin/")) for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(tmp_path / "site"), str(wheel)], check=True)
    assert (tmp_path / "site" / "llama_cpp" / "lib" / "libllama.so.0").is_file()


def test_the_harmless_base_file_is_carried_where_one_is_found(tmp_path):
    source = tmp_path / "hh"
    (source / "harmless-base").mkdir(parents=True)
    (source / "harmless-base" / "test.jsonl.gz").write_bytes(b"rows")
    copied = gpu_wheels.copy_hh_rlhf(source, tmp_path / "whl")
    assert copied == tmp_path / "whl" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    assert copied.read_bytes() == b"rows"
    assert gpu_wheels.copy_hh_rlhf(tmp_path / "empty", tmp_path / "whl2") is None
    assert gpu_wheels.copy_hh_rlhf(None, tmp_path / "whl2") is None


def test_pinned_names_each_version_or_fails_clearly():
    with pytest.raises(SystemExit, match="not installed"):
        gpu_wheels.pinned(["surely-not-a-distribution"])
    assert gpu_wheels.pinned(["surely-not-a-distribution"], required=False) == [
        "surely-not-a-distribution"]


def test_gpu_workflow_runs_make_test_gpu_on_a_gpu_runner():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    job = workflow["jobs"]["test-gpu"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert any("make test-gpu" in step.get("run", "") for step in job["steps"])
    # gpu-run runs make test-gpu's two commands, each as a part of its own
    script = GPU_RUN.read_text()
    assert "-m cuda tests/test_gpu.py" in script and "--nbval-lax" in script


# --------------------------------------------------------------------------------------------
# .ci/gpu-run: one device call of at most 8 minutes, reporting part by part
# --------------------------------------------------------------------------------------------

GPU_RUN = REPO_ROOT / ".ci" / "gpu-run"
PARTS = ("setup", "cuda", "bench", "nbval")      # in the order they run


def gpu_run_settings():
    """The script's defaults: {"BUDGET": .., "CAP_SETUP": .., ..., "KILL_AFTER": .., "RESERVE": ..}."""
    text = GPU_RUN.read_text()
    settings = {name: int(value) for name, value in
                re.findall(r"^(BUDGET|CAP_[A-Z]+)=\$\{GPU_RUN_\w+:-(\d+)\}", text, re.M)}
    settings.update({name: int(value) for name, value in
                     re.findall(r"^(KILL_AFTER|RESERVE)=(\d+)", text, re.M)})
    return settings


def test_gpu_run_parts_and_caps_fit_eight_minutes():
    settings = gpu_run_settings()
    caps = {part: settings[f"CAP_{part.upper()}"] for part in PARTS}
    assert set(settings) == {"BUDGET", "KILL_AFTER", "RESERVE"} | {f"CAP_{p.upper()}" for p in PARTS}
    # each part may run its cap plus timeout's grace before KILL; then the prints and summary
    worst = sum(caps.values()) + len(PARTS) * settings["KILL_AFTER"] + settings["RESERVE"]
    assert worst <= settings["BUDGET"] <= 480, (caps, worst)
    assert all(cap > 0 for cap in caps.values())
    # the script's own table and the README's GPU CI section name each part with its cap
    text = GPU_RUN.read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    for part, cap in caps.items():
        assert re.search(rf"^#   {part}\s+{cap}\s", text, re.M), part
        assert re.search(rf"\| `{part}` \| {cap} s \|", readme), part
    assert "USE_HUB_KERNELS=NO" in text and "HF_HUB_OFFLINE=1" in text
    # gpu-bench is gpu-run's bench part with a longer cap, still within one 10-minute call
    bench = (REPO_ROOT / ".ci" / "gpu-bench").read_text()
    assert 'gpu-run" bench' in bench
    budget = int(re.search(r"GPU_RUN_BUDGET:-(\d+)", bench).group(1))
    cap = int(re.search(r"GPU_RUN_CAP_BENCH:-(\d+)", bench).group(1))
    assert caps["setup"] + cap + 2 * settings["KILL_AFTER"] + settings["RESERVE"] <= budget <= 600


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for the GPU machine's python3: says what it was asked and with which settings
echo "python $* | DPO_PROFILE=${DPO_PROFILE:-} USE_HUB_KERNELS=${USE_HUB_KERNELS:-} \
HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-} DPO_HH_RLHF_DIR=${DPO_HH_RLHF_DIR:-}"
case "$*" in
  *"pip install"*) exit 0 ;;
  *"-m cuda"*) echo "cuda: 3 passed"; sleep "${FAKE_CUDA_SECONDS:-0}"; exit 0 ;;
  *nbval*) echo "nbval: a cell failed"; exit 1 ;;
  *trl_compare*) echo "bench: first job"; sleep 60 ;;
esac
"""


def fake_checkout(tmp_path, wheels=True):
    """A folder shaped like the checkout as it travels: .ci/gpu-run, .whl/, notebooks/; and a
    stand-in python3."""
    root = tmp_path / "checkout"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(GPU_RUN, root / ".ci" / "gpu-run")
    (root / "notebooks").mkdir()
    for name in ("01_a", "02_b", "03_c", "08_d", "10_new"):
        (root / "notebooks" / f"{name}.ipynb").write_text("{}")
    if wheels:
        (root / ".whl" / "hh-rlhf").mkdir(parents=True)
        (root / ".whl" / "x-1.0-py3-none-any.whl").write_bytes(b"")
        (root / ".whl" / "hh-rlhf" / "harmless-base-test.jsonl.gz").write_bytes(b"")
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root, python


def run_gpu_run(root, python, out, *args, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_RUN_", "DPO_HH"))}
    env.update(OUT=str(out), GPU_RUN_PYTHON=str(python), **settings)
    started = time.monotonic()
    done = subprocess.run(["bash", str(root / ".ci" / "gpu-run"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def summary_rows(out):
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines()[2:]:
        part, rest = line.split(None, 1)
        result = "timed out" if rest.startswith("timed out") else \
            "not run" if rest.startswith("not run") else rest.split()[0]
        rows[part] = result
    return rows


def test_gpu_run_writes_each_part_s_log_and_a_summary(tmp_path):
    root, python = fake_checkout(tmp_path)
    out = tmp_path / "out"
    done, seconds = run_gpu_run(root, python, out, GPU_RUN_CAP_BENCH="2")
    print(done.stdout, done.stderr)
    assert done.returncode == 1
    assert seconds < 30                                    # the bench part stopped at its 2 s
    assert summary_rows(out) == {"setup": "passed", "cuda": "passed", "nbval": "failed",
                                 "bench": "timed out", "total": "failed"}
    logs = {p: (out / f"{p}.log").read_text() for p in PARTS}
    assert "cuda: 3 passed" in logs["cuda"] and "nbval: a cell failed" in logs["nbval"]
    assert "bench: first job" in logs["bench"]
    for part in ("cuda", "nbval"):
        assert "DPO_PROFILE=gpu-smoke USE_HUB_KERNELS=NO HF_HUB_OFFLINE=1" in logs[part]
    assert "-m pytest -q -rPs -m cuda tests/test_gpu.py" in logs["cuda"]
    # every notebook, GPU-heavy ones first, any new one last
    # one pytest per notebook, so that each one's failures print when it ends
    ran = [line.split("--nbval-lax ")[1].split()[0] for line in logs["nbval"].splitlines()
           if "--nbval-lax " in line]
    assert ran == ["notebooks/01_a.ipynb", "notebooks/03_c.ipynb", "notebooks/02_b.ipynb",
                   "notebooks/08_d.ipynb", "notebooks/10_new.ipynb"]
    # the seed's setting, few steps, real pairs from the carried file
    assert ("benchmarks/trl_compare.py --model random:pythia-2.8b --quant nf4 --max-length 512 "
            "--batch 4 --accum 8 --mixed-precision bf16 --gradient-checkpointing --stages "
            "preference --steps 1 --warmup 1 --pairs 64 --variants ours-fast,trl-best "
            "--child-timeout 90 --json " + str(out / "bench.json")) in logs["bench"]
    assert f"DPO_HH_RLHF_DIR={root}/.whl/hh-rlhf" in logs["bench"]
    # what comes back from a device call: at most 8 files
    assert len(list(out.iterdir())) <= 8
    # in order; the last part also takes the time the others left unused
    starts = [done.stdout.index(f"== {part}: at most") for part in PARTS]
    assert starts == sorted(starts)
    nbval_cap = int(re.search(r"^nbval .* (\d+)  exit status 1$", (out / "summary.txt").read_text(),
                              re.M).group(1))
    assert gpu_run_settings()["CAP_NBVAL"] < nbval_cap <= 480 - 15


def test_gpu_run_shrinks_a_cap_to_the_budget_left_and_can_run_one_part(tmp_path):
    root, python = fake_checkout(tmp_path)
    out = tmp_path / "out"
    # 25 s budget - 10 reserve - 5 grace: cuda gets at most 10 s, sleeps 30; nothing is left after
    done, seconds = run_gpu_run(root, python, out, GPU_RUN_BUDGET="25", FAKE_CUDA_SECONDS="30")
    assert done.returncode == 1 and seconds < 25
    assert summary_rows(out) == {"setup": "passed", "cuda": "timed out", "nbval": "not run",
                                 "bench": "not run", "total": "failed"}
    assert "no time left" in (out / "summary.txt").read_text()
    out = tmp_path / "quick"
    done, _ = run_gpu_run(root, python, out, "--quick")
    assert done.returncode == 0, done.stdout
    assert summary_rows(out) == {"setup": "passed", "cuda": "passed", "total": "passed"}


def test_gpu_run_without_wheels_says_so(tmp_path):
    root, python = fake_checkout(tmp_path, wheels=False)
    out = tmp_path / "out"
    done, _ = run_gpu_run(root, python, out)
    assert done.returncode == 2
    assert "run 'make gpu-wheels' first, then carry .whl" in (out / "setup.log").read_text()
    assert summary_rows(out) == {"setup": "failed", "cuda": "not run", "nbval": "not run",
                                 "bench": "not run", "total": "failed"}


def test_nbval_skips_notebook_08_saying_why_where_llama_cpp_does_not_import(tmp_path):
    broken = tmp_path / "site" / "llama_cpp"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libggml-base.so.0: cannot open')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)]),
           "DPO_PROFILE": "tiny"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--nbval-lax", "notebooks/08_gguf_deployment.ipynb"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    print(done.stdout[-3000:])
    assert done.returncode == 0
    assert re.search(r"^\d+ skipped", done.stdout.splitlines()[-1])
    assert "notebook 08 needs llama-cpp-python (the deploy extra), which does not import here: " \
           "ImportError: libggml-base.so.0: cannot open" in done.stdout


def test_make_test_gpu_fails_clearly_without_cuda():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run(["make", "-s", "test-gpu", f"PY={sys.executable}"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "make test-gpu needs a CUDA GPU" in done.stderr


def test_notebook_08_is_skipped_where_the_committed_adapter_is_left_out(monkeypatch, tmp_path):
    """The example adapter can be left out of the checkout that travels (git sparse-checkout):
    nbval then skips notebook 08, naming it."""
    import conftest

    if conftest.deploy_notebook_cannot_run() is not None:
        pytest.skip(conftest.deploy_notebook_cannot_run())
    monkeypatch.setattr(conftest, "ROOT", tmp_path)
    monkeypatch.setattr(conftest, "EXAMPLE_ADAPTER", tmp_path / "data" / "adapter")
    assert conftest.deploy_notebook_cannot_run() == (
        "notebook 08 exports the committed example adapter, which is not in this checkout: "
        "data/adapter")
