"""Process memory and file-size helpers shared by the benchmarks in ``bench/`` (Linux only).

Resident memory comes from ``/proc/self/status``: ``VmRSS`` (now) and ``VmHWM`` (the peak, "high
water mark"). Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS
(Linux >= 4.0), which lets one process measure the peak of one phase (e.g. only ``export_onnx``)
rather than of its whole life. The reset also resets what ``getrusage().ru_maxrss`` (and a parent's
``RUSAGE_CHILDREN``) report, so :class:`PhasePeaks` keeps the whole-life peak itself: the maximum
over the phases.
"""

from __future__ import annotations

import math
import re
import resource
from pathlib import Path

MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_mib() -> float:
    """Resident memory now, MiB."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory since start or the last :func:`reset_peak`, MiB."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else float("nan")


def reset_peak() -> bool:
    """Reset the peak to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def lifetime_peak_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), MiB: the process's peak since the last
    :func:`reset_peak` (the whole life if never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhasePeaks:
    """Peak RSS per phase: ``start(name)`` closes the running phase and resets the peak;
    ``stop()`` closes the last one. ``peaks`` maps phase -> MiB (NaN where the kernel refuses the
    reset); ``lifetime`` is the maximum over every phase, i.e. the process's whole-life peak."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self._before = peak_rss_mib()  # everything up to the first phase
        self._current: str | None = None
        self.can_reset = True

    def start(self, name: str) -> None:
        self.stop()
        self.can_reset = reset_peak()
        self._current = name

    def stop(self) -> None:
        if self._current is not None:
            self.peaks[self._current] = peak_rss_mib() if self.can_reset else float("nan")
            self._current = None
        else:
            self._before = max(self._before, peak_rss_mib())

    @property
    def lifetime(self) -> float:
        return max([self._before, peak_rss_mib(), *(v for v in self.peaks.values() if not math.isnan(v))])


def onnx_file_bytes(path: Path) -> tuple[int, int]:
    """(graph file bytes, external data bytes) of an ONNX file written by ``export_onnx``
    (external data, when any, is ``<name>.data`` beside it)."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return path.stat().st_size, data.stat().st_size if data.exists() else 0


def write_results(out: Path, name: str, payload: dict, title: str, text: str) -> None:
    """Print ``text`` and write ``out/name.json`` (``payload``) and ``out/name.md`` (``title`` + ``text``)."""
    import json

    print()
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(f"# {title}\n\n{text}")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
