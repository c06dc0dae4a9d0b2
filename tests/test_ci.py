"""The GPU CI pieces that CPU can check: the wheel preparation for the lent GPU machine, the
workflow file, the make target's clear failure without CUDA."""
import importlib.util
import subprocess
import sys
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


def test_budget_counts_the_working_tree_and_the_wheels(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"\0" * 3000)
    (tmp_path / "b.whl").write_bytes(b"\0" * 1000)
    assert gpu_wheels.check_budget(tmp_path, tree_bytes=500, limit=5000) == 4500
    with pytest.raises(SystemExit, match=r"over the 0 MiB.*largest wheels: a.whl"):
        gpu_wheels.check_budget(tmp_path, tree_bytes=1500, limit=4000)
    assert 0 < gpu_wheels.working_tree_bytes() < gpu_wheels.CARRY_LIMIT


def test_missing_packages_are_the_closure_of_what_the_image_lacks():
    missing = gpu_wheels.missing_distributions()
    assert {"bitsandbytes", "datasets", "gguf", "nbval", "ipykernel", "jupyter-client",
            "pyzmq", "dill", "multiprocess"} <= set(missing)
    assert not {"torch", "transformers", "peft", "numpy", "pandas", "pytest"} & set(missing)
    # Only what this environment needs on Python 3.12: no backports for older Pythons.
    assert "exceptiongroup" not in missing and "tomli" not in missing
    specs = gpu_wheels.pinned(missing)
    assert len(specs) == len(missing) and all("==" in s for s in specs)


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
    assert "make test-gpu" in (REPO_ROOT / ".ci" / "gpu-run").read_text()


def test_make_test_gpu_fails_clearly_without_cuda():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run(["make", "-s", "test-gpu", f"PY={sys.executable}"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "make test-gpu needs a CUDA GPU" in done.stderr
