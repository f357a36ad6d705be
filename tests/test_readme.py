"""The README's examples on the built-in model run as written (Polygraphy's practice: docs are tests).

Every line of a ```bash block that starts with ``ditrt `` (or ``polygraphy ``) and runs on the built-in model (or on
what an earlier such line wrote under ``out/``) is executed in order in one scratch folder, and
must exit 0. Lines that need what this machine has not got are left out, each for a reason the
test names: TensorRT and a GPU, downloaded weights, or minutes of CPU time that other tests spend
on smaller settings (the pipeline: tests/test_pipeline.py; training). The calibrate line runs as
written but records its calibration inputs from a 50-step run instead of the default 250-step one
(:data:`SHORTER`: the same stages in a quarter of the time, as tests/test_pipeline.py does).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
#: what a line must not contain to run here, and why
LEFT_OUT = {
    "ditrt build": "needs TensorRT and a GPU",
    "--engine": "needs TensorRT and a GPU",
    ".plan": "needs TensorRT and a GPU",
    "DiT-XL-2": "needs the official weights, which cannot be downloaded here",
    "sd-vae": "needs the Stable Diffusion VAE, which cannot be downloaded here",
    "dit-diffusers-folder": "needs a real diffusers checkpoint",
    "ditrt train": "minutes of CPU training (the built-in weights it made are committed)",
    "ditrt pipeline": "the main job takes minutes; tests/test_pipeline.py runs it on smaller settings",
    "torchrun": "several processes: the torchrun tests (tests/cli/test_*torchrun.py, test_evaluate_fid.py) run it on tiny models",
    "xl/": "the DiT-XL/2 walk-through needs the official weights and a GPU",
}

#: options appended to a line that runs here as written, on a shorter run of the same code (and why)
SHORTER = {
    "ditrt calibrate": (["--calib-steps", "50"], "recording the default 250-step run took 2 of the test's 3 minutes"),
}


def readme_commands() -> list[tuple[str, str | None]]:
    """(command line, reason it is left out or None) for every ``ditrt`` line of the README's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(("ditrt ", "polygraphy ")):
                continue
            reason = next((why for key, why in LEFT_OUT.items() if key in line), None)
            out.append((line, reason))
    return out


def test_the_readme_has_built_in_examples_to_run():
    runnable = [c for c, why in readme_commands() if why is None]
    assert len(runnable) >= 8 and any(c.startswith("polygraphy ") for c in runnable), runnable


@pytest.mark.slow
def test_the_readme_examples_on_the_built_in_model_run(tmp_path, monkeypatch):
    """The ``ditrt`` lines run in this process through click's runner (the same command and arguments,
    without starting an interpreter and importing torch per line; tests/cli run ``python -m ditrt`` in
    real processes), the ``polygraphy`` line as the installed console script."""
    from click.testing import CliRunner

    from ditrt.cli import main

    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for line, why in readme_commands():
        if why is not None:
            continue
        tool, *args = shlex.split(line)
        args += next((extra for key, (extra, _) in SHORTER.items() if line.startswith(key) and "--calib-steps" not in line), [])
        if tool == "ditrt":
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, f"`{line}` exited {r.exit_code}:\n{_failure(r)}"
        else:
            command = [str(Path(sys.executable).with_name(tool)), *args]
            p = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, f"`{line}` exited {p.returncode}:\n{p.stderr[-2000:]}"


def _failure(result) -> str:
    """The end of a failed command's output, and the traceback of an exception that is not an exit."""
    text = result.output[-2000:]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "".join(traceback.format_exception(result.exception))[-3000:]
    return text
