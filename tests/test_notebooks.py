"""The teaching notebooks: each runs top to bottom, and each .ipynb matches its .py.

The ``.py`` files (jupytext ``py:percent``) are the source of truth; the paired ``.ipynb``
files are stored without outputs. After editing a ``.py``, regenerate its notebook with
``jupytext --sync notebooks/NN_name.py`` (or ``jupytext --to ipynb``).

Execution uses nbclient directly (what ``pytest --nbmake`` wraps), so the test controls the
environment: ``TENSORSCOPE_CACHE_DIR`` points at one folder for the whole session (a temporary
one unless the variable is already set, e.g. to a CI cache), and the built-in examples are
trained into it once, before the first notebook, so each notebook's time limit covers the
notebook alone. ``TENSORSCOPE_NOTEBOOK_TIMEOUT`` (seconds, default 600) bounds each notebook
as a whole; the notebooks take under two minutes each on a 2-core machine.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SCRIPTS = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
TIMEOUT = int(os.environ.get("TENSORSCOPE_NOTEBOOK_TIMEOUT", "600"))


def _ids(paths):
    return [p.stem for p in paths]


def test_notebooks_exist():
    assert len(SCRIPTS) >= 4, f"expected the teaching notebooks in {NB_DIR}; found {[p.name for p in SCRIPTS]}"


# ---- the pairs are in sync -------------------------------------------------------------------


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_ipynb_in_sync_with_py(script):
    ipynb = script.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `jupytext --to ipynb {script.relative_to(ROOT)}`"
    from_py = jupytext.read(script)
    stored = nbformat.read(ipynb, as_version=4)
    assert _cells(stored) == _cells(from_py), (
        f"{ipynb.name} differs from {script.name}: run `jupytext --sync {script.relative_to(ROOT)}` "
        "(the .py is the source of truth)"
    )
    # and the round trip through the .ipynb gives the same cells back
    assert _cells(jupytext.reads(jupytext.writes(stored, fmt="py:percent"), fmt="py:percent")) == _cells(from_py)


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_ipynb_stored_without_outputs(script):
    stored = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    dirty = [i for i, c in enumerate(stored.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{script.with_suffix('.ipynb').name}: cells {dirty} carry outputs; strip them"


# ---- they run ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory):
    """One example cache for all notebooks, trained once; the kernels inherit os.environ."""
    keys = ("TENSORSCOPE_CACHE_DIR", "PYTHONPATH")
    saved = {k: os.environ.get(k) for k in keys}
    cache = saved["TENSORSCOPE_CACHE_DIR"] or str(tmp_path_factory.mktemp("tensorscope-cache"))
    os.environ["TENSORSCOPE_CACHE_DIR"] = cache
    # the kernels import this checkout's tensorscope even when it is not pip-installed
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from tensorscope.examples import list_examples, load_example

        for name in list_examples():
            load_example(name, progress=False)
        yield cache
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_notebook_runs(script, notebook_env):
    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    deadline = time.monotonic() + TIMEOUT
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT,
        # the whole notebook shares one budget: each cell gets what is left of it
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    seconds = time.monotonic() - start
    print(f"{script.name}: {seconds:.0f} s")
    assert seconds < TIMEOUT
