"""Test-only start-up hook for scripts/gpu_check.py; never part of the package, never read by sage-llm itself.

scripts/gpu_check.py puts this folder on PYTHONPATH of the `sage-llm` processes it runs, and only of those; Python
imports this file at start-up (site.py). It does nothing unless one of these is set:

  SAGE_LLM_CHECK_FAKE_NVML=DIR   sage_llm.observe.gpu talks to a fake NVML fed by the ledger DIR (tests/fakes/fake_gpu.py),
                                 so the whole check runs on a machine without a GPU
  SAGE_LLM_CHECK_HIDE_DRIVER=1   sage_llm.observe.gpu sees no driver (what tests/conftest.py does in-process), to time
                                 `status --json` on the no-driver path on a machine that has one

Then it runs the sitecustomize this one shadows, if any.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("SAGE_LLM_CHECK_HIDE_DRIVER") == "1":
    from sage_llm.observe import gpu as _gpu

    _gpu.DRIVER_MARKERS = ("/nonexistent/sage-llm-gpu-check/nvidiactl",)
    _gpu.reset()
elif os.environ.get("SAGE_LLM_CHECK_FAKE_NVML"):
    from pathlib import Path as _Path

    _fakes = str(_Path(_here).parent.parent / "tests" / "fakes")
    sys.path.append(_fakes)
    import fake_gpu as _fake_gpu

    from sage_llm.observe import gpu as _gpu

    _gpu.set_backend(_fake_gpu.ledger_nvml(_Path(os.environ["SAGE_LLM_CHECK_FAKE_NVML"])))
    sys.path.remove(_fakes)


def _chain() -> None:
    """Run the next sitecustomize on sys.path (a distribution's own), which this file hides."""
    import importlib.util

    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _here:
            continue
        path = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_sitecustomize_next", path)
            if spec and spec.loader:
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                except Exception:
                    pass
            return


_chain()
