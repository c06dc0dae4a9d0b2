"""What the machine says about this process: its peak resident memory."""
from __future__ import annotations


def peak_rss_mb(status_file: str = "/proc/self/status", field: str = "VmHWM") -> float | None:
    """This process's peak resident memory in MiB, or None where the system does not say.

    Linux: ``VmHWM`` from ``/proc/self/status`` (this process's own peak; ``ru_maxrss`` of a
    forked child would include its parent's); ``field="VmRSS"`` reads the resident size now. Elsewhere: ``resource.getrusage``'s ``ru_maxrss``
    (bytes on macOS, KiB on other Unix systems), then psutil's peak working set (Windows, when
    psutil is installed). Self-contained (its imports inside), so that a subprocess script can
    carry its source.
    """
    import sys

    try:
        with open(status_file) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    try:
        import psutil
    except ImportError:
        return None
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
    return None if peak is None else peak / 2**20
