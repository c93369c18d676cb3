"""AIGC: a self-hosted engine for vertical AI-generated content."""
import os as _os

__version__ = "0.1.0"

# OpenMP threads spin only briefly before they sleep (aigc/threads.py says why and what was measured).
# libgomp reads this once, when torch loads it, so it is set here, before anything imports torch.
# An OpenMP wait policy or spin count the user set wins.
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from aigc import threads as _threads  # noqa: E402  (no torch import: it only opens the first load window)

_threads._start_meter()
