"""Peak resident memory of this process over a stretch of work, for the benchmark workers of both sides.

Linux keeps the high-water mark of the resident set (VmHWM) and resets it when "5" is written to
/proc/self/clear_refs, so a peak can be taken over the timed calls alone, weights included. Where that file
cannot be written the peak is the lifetime maximum (ru_maxrss), and `kind` says so.
"""

from __future__ import annotations

import resource
import sys


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ResidentPeak:
    def __init__(self) -> None:
        self.kind = "process VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "process lifetime max RSS"

    def peak(self) -> int:
        if self.kind == "process VmHWM":
            hwm = _vm_hwm()
            if hwm is not None:
                return hwm
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
