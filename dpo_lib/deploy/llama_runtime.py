"""llama.cpp as this project uses it: the installed llama-cpp-python runtime, the GGUF converter
of the same version, the runtime's log, GGUF headers and the CPU threads to give it.

:mod:`dpo_lib.deploy.export` (making GGUF files), :mod:`dpo_lib.deploy.gguf_check` (checking them),
:mod:`dpo_lib.deploy.chat` and :mod:`dpo_lib.deploy.app` (talking to them) share these.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..core.models import cache_dir
from ..core.errors import MissingPackageError, UserError

CONVERTER_ENV = "DPO_LLAMA_CPP_CONVERTER"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def cpu_threads() -> int:
    """The cores this process may use (llama.cpp's default is half the machine's): its CPU
    affinity where the system has one (Linux), else every core (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ExportError(UserError, RuntimeError):
    """A step of the export failed; the message says which and what to do."""


class ConverterVersionError(ExportError):
    """The converter, the runtime or the checkpoint's transformers version do not match."""


class UnsupportedArchitectureError(ExportError):
    """llama.cpp's converter has no support for the model's architecture."""


# --------------------------------------------------------------------------------------------
# The llama.cpp converter at the runtime's version
# --------------------------------------------------------------------------------------------

def runtime_version() -> str:
    """The installed llama-cpp-python version (the runtime that loads the GGUF files)."""
    try:
        import llama_cpp
    except ImportError as error:
        raise MissingPackageError(
            "GGUF export and chat need llama-cpp-python: pip install 'dpo-quant[deploy]' (or "
            "`make setup`); it builds from source, about 6 minutes on 2 cores.") from error
    return llama_cpp.__version__


def fetch_converter(version: str, dest: Path, sdist: str | os.PathLike | None = None) -> Path:
    """Extract the converter of llama-cpp-python ``version`` into ``dest``.

    From ``sdist`` (a ``llama_cpp_python-<version>.tar.gz``) when given, else from the source
    distribution that ``pip download`` fetches from the package registry (76 MB; only the
    converter, its ``conversion`` package and ``gguf-py``, about 2 MB, are kept). Writes
    ``dest/VERSION``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                       "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if result.returncode != 0 or not found:
                raise ExportError(
                    f"could not download the source distribution of llama-cpp-python=={version}, "
                    f"which holds the matching GGUF converter:\n{result.stderr.strip()[-800:]}\n"
                    f"Offline: fetch llama_cpp_python-{version}.tar.gz elsewhere and run "
                    f"`dpo-export --fetch-converter --sdist FILE`, or point "
                    f"${CONVERTER_ENV} at an extracted vendor/llama.cpp folder holding a VERSION "
                    f"file.")
            sdist = found[0]
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_FILES]
            if not members:
                raise ConverterVersionError(f"{sdist} is not llama-cpp-python {version}'s source "
                                            f"distribution (no {prefix}convert_hf_to_gguf.py)")
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(staging, members=members, filter="data")
        (staging / "VERSION").write_text(version + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return dest


def check_converter(folder: Path, version: str | None = None) -> Path:
    """``folder`` if it holds the converter of the runtime's version, else ConverterVersionError."""
    version = version or runtime_version()
    stamp = folder / "VERSION"
    if not (folder / "convert_hf_to_gguf.py").is_file() or not stamp.is_file():
        raise ConverterVersionError(f"{folder} holds no llama.cpp converter with a VERSION file")
    found = stamp.read_text().strip()
    if found != version:
        raise ConverterVersionError(
            f"the GGUF converter in {folder} is llama-cpp-python {found}'s, the installed runtime "
            f"is {version}: a converter newer or older than the runtime can write files that the "
            f"runtime misreads. Run `dpo-export --fetch-converter` for {version}'s.")
    return folder


def converter_dir(fetch: bool = True) -> Path:
    """The converter matching the installed runtime: ``$DPO_LLAMA_CPP_CONVERTER`` if set, else
    ``<cache>/llama.cpp-<version>``, fetched there (:func:`fetch_converter`) when missing."""
    version = runtime_version()
    if os.environ.get(CONVERTER_ENV):
        return check_converter(Path(os.environ[CONVERTER_ENV]).expanduser(), version)
    folder = cache_dir() / f"llama.cpp-{version}"
    if not (folder / "VERSION").is_file() and fetch:
        fetch_converter(version, folder)
    return check_converter(folder, version)



# --------------------------------------------------------------------------------------------
# The runtime's log and GGUF headers
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_llama_log():
    """Collect llama.cpp's log into a list instead of the output: native code writes to file
    descriptor 2, and llama-cpp-python's log callback to ``sys.stderr`` (a notebook's stream)."""
    import io

    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    python_log = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as log, contextlib.redirect_stderr(python_log):
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode("utf-8", "replace").splitlines())
            lines.extend(python_log.getvalue().splitlines())


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The scalar and string fields of a GGUF file's header (through the ``gguf`` package)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        fields[name] = (bytes(value).decode("utf-8", "replace")
                        if field.types[0] == GGUFValueType.STRING else value.tolist()[0])
    return fields
