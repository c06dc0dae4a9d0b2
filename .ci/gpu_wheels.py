"""Wheels for this workplace's lent GPU machine, which has no network: what its image lacks.

The machine (device tool, see .library/device) has CUDA torch, pandas, matplotlib and pytest, and
older transformers (5.17), huggingface_hub (1.33), tokenizers, peft and accelerate than this
project's, but not bitsandbytes, datasets, gguf, nbval, a Jupyter kernel or trl. This script puts
them into ``.whl/`` (git-ignored), pinned to the versions of the virtual environment that runs it,
for the machine's Python 3.12 on x86-64: the closure of ``ROOTS`` (followed down to what the image
has) plus the project's own ``PROJECT_VERSIONS`` with what they need, without ``LEAVE_OUT``:

    .venv/bin/python .ci/gpu_wheels.py            # or: make gpu-wheels

then a device call carrying ``.whl`` runs ``bash .ci/gpu-run`` (README: "GPU CI"). Everything that
travels (the working tree and all of ``.whl/``) must stay within the 64 MiB a call may carry; the
script measures it and stops where it is over. To stay well inside:

* the bitsandbytes wheel (43 MB, a native library per CUDA and ROCm version) is rewritten with only
  the CPU library and those of the machine's CUDA 13 (``--keep``);
* debugpy and jedi are left out (ipykernel and IPython run without them: no debugger, no
  completion, which nbval never asks for);
* the real hh-rlhf harmless-base test file (0.7 MB) is copied into ``.whl/hh-rlhf/`` where one is
  found (``--hh-rlhf``, default ``$DPO_HH_RLHF_DIR`` or ``../shared/data/hh-rlhf``): gpu-run's
  benchmark then trains on real pairs;
* llama-cpp-python (notebook 08) has no wheel on PyPI: it is built here from source with a
  Python 3.12 found on PATH or through pyenv (a generic x86-64 build, 3 to 6 minutes on 2 cores the
  first time; pip caches it; ``--no-llama`` skips it), then slimmed to its package's own libraries
  (24 MB -> about 6 MB: the wheel holds each library six times), and llama.cpp's converter of the
  same version travels as ``llama.cpp-<version>.tar.gz`` (0.3 MB). Without it, nbval skips
  notebook 08, saying why (conftest.py).

The example adapter ``data/example-runs/cpu-hh/dpo/adapter`` (9.4 MiB, tracked) is counted with
the working tree and fits. Where a call needs the room, leave it out of the working tree with
``git sparse-checkout set --no-cone '/*' '!/data/example-runs/cpu-hh/dpo/adapter/'`` (git status
stays clean; the budget then counts the tree without it) and bring it back with
``git sparse-checkout disable``; notebook 08 needs it, and nbval then skips 08, saying why. The
final track's adapters (``data/example-runs/cpu-hh-final/*/adapter``, about 15 MiB) are needed
by no notebook on that machine: where the budget is over, the script's error names the
sparse-checkout line that leaves them behind (``SPARSE_HINT``).
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
# The image has these, older than the project's (transformers 5.17 and huggingface_hub 1.33 there
# against 5.25 and 2.x here): carried at this environment's versions, with what they need.
PROJECT_VERSIONS = ["transformers", "tokenizers", "huggingface-hub", "peft", "accelerate",
                    "safetensors"]
# Required by a root but left out: ipykernel runs without debugpy (it only turns its debugger
# off) and IPython without jedi (completion only), neither of which nbval asks for: 4 MB and 5 MB
# of wheels (with parso, jedi's own need) of the 64 MiB.
LEAVE_OUT = {"debugpy", "jedi"}
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
HH_RLHF_FILE = "harmless-base-test.jsonl.gz"
EXAMPLE_ADAPTER = "data/example-runs/cpu-hh/dpo/adapter"
#: Leaves the final track's adapters (data/example-runs/cpu-hh-final/*/adapter, about 15 MiB; notebook
#: 07 reads only their comparison) out of the working tree that travels; `git sparse-checkout
#: disable` brings them back.
SPARSE_HINT = ("git sparse-checkout set --no-cone '/*' "
               "'!/data/example-runs/cpu-hh-final/*/adapter/'")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_distributions(roots=tuple(ROOTS) + tuple(PROJECT_VERSIONS), image=IMAGE_HAS,
                          carry=PROJECT_VERSIONS, leave_out=LEAVE_OUT) -> list[str]:
    """``roots`` and everything they require (markers evaluated for the GPU machine's Python
    3.12, extras off), stopping at what ``image`` has unless ``carry`` names it, without
    ``leave_out``, as installed in this environment."""
    from packaging.requirements import Requirement

    stop = ({normalized(n) for n in image} - {normalized(n) for n in carry}) | \
        {normalized(n) for n in leave_out}
    missing, todo = set(), [normalized(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in missing or name in stop:
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


def rewrite_wheel(wheel: Path, drop) -> tuple[int, list[str]]:
    """Rewrite ``wheel`` in place without the files for which ``drop(name)`` is true, with a RECORD
    that lists what is left (true hashes and sizes), so that pip still verifies it. Returns the
    bytes saved and the names dropped."""
    before = wheel.stat().st_size
    dropped = []
    with zipfile.ZipFile(wheel) as source:
        infos = source.infolist()
        record = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        kept = []
        for info in infos:
            if info.filename != record and drop(info.filename):
                dropped.append(info.filename)
            elif info.filename != record:
                kept.append(info)
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


def slim_wheel(wheel: Path, keep: tuple[str, ...] = KEEP_LIBRARIES) -> tuple[int, list[str]]:
    """Drop ``bitsandbytes/libbitsandbytes_<suffix>.so`` files whose suffix starts with none of
    ``keep``, rewriting the wheel's RECORD so that pip still verifies it. In place; returns the
    bytes saved and the names dropped."""
    def native(name):
        base = Path(name).name
        return base.startswith("libbitsandbytes_") and base.endswith(".so")

    def drop(name):
        return native(name) and not Path(name).name[len("libbitsandbytes_"):].startswith(keep)

    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
    if any(native(n) for n in names) and all(drop(n) for n in names if native(n)):
        raise ValueError(f"--keep {keep} would leave {wheel.name} no native library at all")
    return rewrite_wheel(wheel, drop)


def slim_llama_wheel(wheel: Path) -> tuple[int, list[str]]:
    """llama-cpp-python's wheel holds each native library six times: in ``llama_cpp/lib/`` and
    again in a top-level ``lib/`` (with ``include/`` and ``bin/``, for C users), each as
    ``libX.so``, ``libX.so.0`` and ``libX.so.0.N.M`` (a wheel cannot hold links). The package loads
    ``llama_cpp/lib/libX.so`` and the libraries find each other by their soname ``libX.so.0``:
    only those two names under ``llama_cpp/`` are kept."""
    def drop(name):
        top = name.split("/")[0]
        if top.endswith(".dist-info"):
            return False
        if top != "llama_cpp":
            return True
        return re.fullmatch(r"llama_cpp/lib/lib[\w.-]+?\.so\.\d+\.\d+\.\d+", name) is not None

    return rewrite_wheel(wheel, drop)


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
    for wheel in dest.glob("llama_cpp_python-*.whl"):
        saved, _ = slim_llama_wheel(wheel)
        print(f"{wheel.name}: {saved / 2**20:.1f} MiB of repeated libraries dropped, "
              f"{wheel.stat().st_size / 2**20:.1f} MiB left")


def pack_converter(dest: Path) -> Path:
    """llama.cpp's GGUF converter of the same version (dpo_lib.deploy.llama_runtime fetches it
    here from the registry; the GPU machine has none), as dest/llama.cpp-<version>.tar.gz, which
    gpu-run unpacks for $DPO_LLAMA_CPP_CONVERTER there."""
    import tarfile

    from dpo_lib.deploy.llama_runtime import fetch_converter
    from dpo_lib.core.models import cache_dir

    version = LLAMA_CPP[1]
    source = cache_dir() / f"llama.cpp-{version}"
    if not (source / "VERSION").is_file():
        fetch_converter(version, source)
    target = dest / f"llama.cpp-{version}.tar.gz"
    with tarfile.open(target, "w:gz") as archive:
        archive.add(source, arcname=source.name,
                    filter=lambda info: None if "__pycache__" in info.name else info)
    return target


def default_hh_rlhf_dir() -> Path | None:
    """``$DPO_HH_RLHF_DIR``, else ``../shared/data/hh-rlhf`` beside the checkout, if it exists."""
    folder = os.environ.get("DPO_HH_RLHF_DIR")
    candidates = [Path(folder).expanduser()] if folder else []
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "hh-rlhf")
    return next((c for c in candidates if c.is_dir()), None)


def copy_hh_rlhf(folder: Path | None, dest: Path) -> Path | None:
    """The harmless-base test file into dest/hh-rlhf/ (flat name), for $DPO_HH_RLHF_DIR on the
    GPU machine; None where ``folder`` holds none."""
    if folder is None:
        return None
    for candidate in (folder / HH_RLHF_FILE, folder / "harmless-base" / "test.jsonl.gz"):
        if candidate.is_file():
            target = dest / "hh-rlhf" / HH_RLHF_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(candidate, target)
            return target
    return None


def working_tree_bytes(root: Path = REPO_ROOT) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked files and untracked
    ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / os.fsdecode(p)).stat().st_size for p in listed
               if p and (root / os.fsdecode(p)).is_file())


def carried_bytes(folder: Path) -> dict[str, int]:
    """Every file under the carried folder (wheels, the hh-rlhf file, the converter), by path."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file()}


def check_budget(wheels: Path, tree_bytes: int, limit: int = CARRY_LIMIT) -> int:
    """Total bytes that would travel (the working tree and everything in the carried folder); a
    clear error where it is over the limit."""
    sizes = carried_bytes(wheels)
    total = tree_bytes + sum(sizes.values())
    if total > limit:
        largest = ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in
                            sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise SystemExit(f"{total / 2**20:.1f} MiB would travel (working tree "
                         f"{tree_bytes / 2**20:.1f} MiB + wheels), over the {limit / 2**20:.0f} "
                         f"MiB a device call may carry; largest wheels: {largest}. The committed "
                         f"adapters can stay behind: {SPARSE_HINT}")
    return total


def wheel_specs() -> list[str]:
    """``name==version`` of every wheel that travels (llama-cpp-python aside), as pinned here."""
    return pinned(missing_distributions())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".whl")
    parser.add_argument("--keep", nargs="+", default=list(KEEP_LIBRARIES),
                        help="bitsandbytes native libraries to keep, by suffix prefix "
                             "(default: cpu cuda13)")
    parser.add_argument("--no-llama", action="store_true",
                        help="leave out llama-cpp-python and its converter (nbval then skips "
                             "notebook 08)")
    parser.add_argument("--python312", help="the Python 3.12 to build llama-cpp-python with")
    parser.add_argument("--hh-rlhf", type=Path, default=default_hh_rlhf_dir(),
                        help="a folder with the hh-rlhf harmless-base test file to carry "
                             "(default: $DPO_HH_RLHF_DIR, else ../shared/data/hh-rlhf)")
    parser.add_argument("--list", action="store_true",
                        help="print the pinned wheels that would travel and stop")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(wheel_specs()))
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("bitsandbytes-*.whl"):     # slimmed before: pip would call it corrupt
        old.unlink()
    if args.no_llama:                                    # from an earlier run
        for old in [*args.dest.glob("llama_cpp_python-*.whl"), *args.dest.glob("diskcache-*.whl"),
                    *args.dest.glob("llama.cpp-*")]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for old in args.dest.glob("llama.cpp-*"):
        if old.is_dir():                                 # the converter travels packed now
            shutil.rmtree(old)
    specs = wheel_specs()
    wanted = {normalized(s.split("==")[0]) for s in specs} | (
        set() if args.no_llama else {normalized(LLAMA_CPP[0]), *LLAMA_CPP_NEEDS})
    for old in args.dest.glob("*.whl"):                  # left from another set: not carried
        if normalized(old.name.split("-")[0]) not in wanted:
            print(f"removing {old.name} (no longer in the list)")
            old.unlink()
    download(specs, args.dest)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        saved, dropped = slim_wheel(wheel, tuple(args.keep))
        if dropped:
            print(f"{wheel.name}: dropped {len(dropped)} native libraries, "
                  f"{saved / 2**20:.1f} MiB saved")
    if not args.no_llama:
        build_llama_cpp(args.dest, args.python312)
        print("converter:", pack_converter(args.dest))
    hh = copy_hh_rlhf(args.hh_rlhf, args.dest)
    print(f"hh-rlhf: {hh}" if hh else "hh-rlhf: no harmless-base file found (--hh-rlhf): the "
          "GPU benchmark will use the bundled pairs")
    names = [w.name.split("-")[0].lower() for w in args.dest.glob("*.whl")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"{args.dest} holds two versions of {', '.join(duplicates)}: pip would "
                         f"refuse the install; empty it and run again")
    tree = working_tree_bytes()
    total = check_budget(args.dest, tree)
    adapter = REPO_ROOT / EXAMPLE_ADAPTER
    print(f"{len(names)} wheels in {args.dest}; {total / 2**20:.1f} MiB would travel "
          f"(working tree {tree / 2**20:.1f} MiB"
          f"{', the example adapter in it' if adapter.is_dir() else ', without the example adapter'}"
          f", carried {(total - tree) / 2**20:.1f} MiB), limit {CARRY_LIMIT / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
