"""Wheels for this workplace's lent GPU machine, which has no network: what its image lacks.

The machine (device tool, see .library/device) has CUDA torch, transformers, peft, accelerate,
pandas, matplotlib and pytest, but not bitsandbytes, datasets, gguf, nbval or a Jupyter kernel.
This script puts them into ``.whl/`` (git-ignored), pinned to the
versions of the virtual environment that runs it, for the machine's Python 3.12 on x86-64:

    .venv/bin/python .ci/gpu_wheels.py            # or: make gpu-wheels

then a device call carrying ``.whl`` runs ``bash .ci/gpu-run`` (README: "GPU CI"). Everything that
travels (the working tree and the wheels) must stay within the 64 MiB a call may carry, so the
bitsandbytes wheel (43 MB, a native library per CUDA and ROCm version) is rewritten with only the
CPU library and those of the machine's CUDA 13 (``--keep``). llama-cpp-python has no wheel on PyPI
and is built here from source, with a Python 3.12 found on PATH or through pyenv (3 to 6 minutes
on 2 cores the first time; pip caches the build; ``--no-llama`` skips it).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 1024 ** 2          # bytes a device call may carry: working tree + wheels
# What the notebooks and tests need on the GPU machine beyond its image: bitsandbytes, the data
# stack, the GGUF reader, nbval and a Jupyter kernel; their needs are followed from this
# environment's metadata (for Python 3.12 on Linux) down to what the image already has.
ROOTS = ["bitsandbytes", "datasets", "gguf", "nbval", "ipykernel", "trl"]
# The GPU image's Python packages, from .library/device/KINDS.md as read on 2026-11-17.
IMAGE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split())
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "extra": ""}
LLAMA_CPP = ("llama-cpp-python", "0.3.36")     # the deploy extra (notebook 08); diskcache is its own need
LLAMA_CPP_NEEDS = ["diskcache"]
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]
KEEP_LIBRARIES = ("cpu", "cuda13")    # bitsandbytes/libbitsandbytes_<suffix>.so kept by default


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_distributions(roots=ROOTS, image=IMAGE_HAS) -> list[str]:
    """``roots`` and everything they require (markers evaluated for the GPU machine's Python
    3.12, extras off), stopping at what ``image`` has, as installed in this environment."""
    from packaging.requirements import Requirement

    missing, todo = set(), [normalized(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in missing or name in image:
            continue
        missing.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.executable}: run this with the "
                             f"project's environment (make setup; .venv/bin/python)") from None
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                todo.append(normalized(requirement.name))
    return sorted(missing)


def pinned(names: list[str], required: bool = True) -> list[str]:
    """``name==version`` for each distribution, at the version installed where this runs (a
    distribution not installed here: an error, or its newest version where not ``required``)."""
    specs = []
    for name in names:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if not required:
                specs.append(name)
                continue
            raise SystemExit(f"{name} is not installed in {sys.executable}: run this with the "
                             f"project's environment (make setup; .venv/bin/python)") from None
    return specs


def download(specs: list[str], dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, "-d", str(dest), *specs], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(wheel: Path, keep: tuple[str, ...] = KEEP_LIBRARIES) -> tuple[int, list[str]]:
    """Drop ``bitsandbytes/libbitsandbytes_<suffix>.so`` files whose suffix starts with none of
    ``keep``, rewriting the wheel's RECORD so that pip still verifies it. In place; returns the
    bytes saved and the names dropped."""
    before = wheel.stat().st_size
    dropped = []
    with zipfile.ZipFile(wheel) as source:
        infos = source.infolist()
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        kept = []
        for info in infos:
            base = Path(info.filename).name
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and not \
                    base[len("libbitsandbytes_"):].startswith(keep):
                dropped.append(info.filename)
            elif info.filename != record:
                kept.append(info)
        if not any(Path(i.filename).name.startswith("libbitsandbytes_") for i in kept) and dropped:
            raise ValueError(f"--keep {keep} would leave {wheel.name} no native library at all")
        with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
                lines = []
                for info in kept:
                    data = source.read(info)
                    target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                    if not info.is_dir():
                        lines.append(_record_line(info.filename, data))
                lines.append(f"{record},,")
                target.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp.name, wheel)
    wheel.chmod(0o644)
    return before - wheel.stat().st_size, dropped


def find_python312() -> str | None:
    """A working Python 3.12 here: python3.12 on PATH, else pyenv's newest 3.12."""
    candidates = [shutil.which("python3.12")] + [
        str(p) for p in sorted((Path.home() / ".pyenv/versions").glob("3.12*/bin/python3"))[::-1]]
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if check.returncode == 0 and check.stdout.strip() == "(3, 12)":
            return candidate
    return None


def build_llama_cpp(dest: Path, python312: str | None) -> None:
    python312 = python312 or find_python312()
    if python312 is None:
        raise SystemExit("building llama-cpp-python for the GPU machine needs a Python 3.12 here "
                         "(python3.12 on PATH, or pyenv's 3.12); give one with --python312, or "
                         "skip it with --no-llama")
    name, version = LLAMA_CPP
    print(f"building {name} {version} with {python312} (3 to 6 minutes on 2 cores the first "
          f"time; pip caches the wheel)", flush=True)
    # A generic x86-64 build: the GPU machine's processor is not this one.
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    subprocess.run([python312, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
                    f"{name}=={version}"], check=True, env=env)
    download(pinned(LLAMA_CPP_NEEDS, required=False), dest)


def copy_converter(dest: Path) -> Path:
    """llama.cpp's GGUF converter of the same version (dpo_lib.deploy.llama_runtime fetches it here from the
    registry; the GPU machine has none): into dest/llama.cpp-<version>, for
    $DPO_LLAMA_CPP_CONVERTER there."""
    from dpo_lib.deploy.llama_runtime import fetch_converter
    from dpo_lib.core.models import cache_dir

    version = LLAMA_CPP[1]
    source = cache_dir() / f"llama.cpp-{version}"
    if not (source / "VERSION").is_file():
        fetch_converter(version, source)
    target = dest / f"llama.cpp-{version}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def working_tree_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked files and untracked
    ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / os.fsdecode(p)).stat().st_size for p in listed
               if p and (root / os.fsdecode(p)).is_file())


def check_budget(wheels: Path, tree_bytes: int, limit: int = CARRY_LIMIT) -> int:
    """Total bytes that would travel; a clear error where it is over the limit."""
    sizes = {w.name: w.stat().st_size for w in sorted(wheels.glob("*.whl"))}
    extra = sum(f.stat().st_size for f in wheels.glob("llama.cpp-*/**/*") if f.is_file())
    total = tree_bytes + sum(sizes.values()) + extra
    if total > limit:
        largest = ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in
                            sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise SystemExit(f"{total / 2**20:.1f} MiB would travel (working tree "
                         f"{tree_bytes / 2**20:.1f} MiB + wheels), over the {limit / 2**20:.0f} "
                         f"MiB a device call may carry; largest wheels: {largest}")
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".whl")
    parser.add_argument("--keep", nargs="+", default=list(KEEP_LIBRARIES),
                        help="bitsandbytes native libraries to keep, by suffix prefix "
                             "(default: cpu cuda13)")
    parser.add_argument("--no-llama", action="store_true", help="skip building llama-cpp-python")
    parser.add_argument("--python312", help="the Python 3.12 to build llama-cpp-python with")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("bitsandbytes-*.whl"):     # slimmed before: pip would call it corrupt
        old.unlink()
    download(pinned(missing_distributions()), args.dest)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        saved, dropped = slim_wheel(wheel, tuple(args.keep))
        if dropped:
            print(f"{wheel.name}: dropped {len(dropped)} native libraries, "
                  f"{saved / 2**20:.1f} MiB saved")
    if not args.no_llama:
        build_llama_cpp(args.dest, args.python312)
        print("converter:", copy_converter(args.dest))
    names = [w.name.split("-")[0].lower() for w in args.dest.glob("*.whl")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"{args.dest} holds two versions of {', '.join(duplicates)}: pip would "
                         f"refuse the install; empty it and run again")
    tree = working_tree_bytes()
    total = check_budget(args.dest, tree)
    print(f"{len(names)} wheels in {args.dest}; {total / 2**20:.1f} MiB would travel "
          f"(working tree {tree / 2**20:.1f} MiB), limit {CARRY_LIMIT / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
