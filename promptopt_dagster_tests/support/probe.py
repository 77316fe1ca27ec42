"""Run a few lines of Python in a fresh interpreter: for facts about one process (what it has
imported, how many threads it runs) that the test process, with everything loaded, cannot show."""

from __future__ import annotations

import subprocess
import sys


def probe_lines(*lines: str, timeout_s: float = 300.0) -> list[str]:
    """The lines `lines` print, run as one script by this interpreter (warnings off)."""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", "\n".join(lines)], capture_output=True,
                          text=True, timeout=timeout_s, check=True)
    return done.stdout.splitlines()
