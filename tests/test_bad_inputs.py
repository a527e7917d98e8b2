"""Bad inputs and faults, table-driven: each row is one command a hostile new user might run.

A small store is built once (a tiny BERT through the real CLI). Every row copies it, damages the copy
or sets a fault, runs `saema …` in this process and checks: the exit code, one clear line naming what
was wrong (a fragment of it), no traceback, and the store afterwards — byte for byte as before
("same"), or every earlier file unchanged with new files allowed ("kept", a resumable partial write).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from saema.cli import main
from tests.tiny_models import tiny_run_args

HOOK = "blocks.1.hook_resid_post"
CONCEPT_GROUP = f"activations/bert.zarr/concepts/days/{HOOK}"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dirs):
    """A complete store of the tiny run (kept pristine), where rows run, the model and the corpus.

    Rows run at the path the store was built at: the task cache is keyed by it, so a fully cached
    command stays fully cached."""
    from storage.corpus import iter_documents

    root = tmp_path_factory.mktemp("bad-inputs")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    out = root / "store"
    assert main(["run", *tiny_run_args(out, tiny_model_dirs["bert"], corpus)]) == 0
    shutil.copytree(out, root / "pristine", symlinks=True)
    return root / "pristine", out, tiny_model_dirs["bert"], corpus


def snapshot(out: Path) -> dict[str, str]:
    """Every file under `out` (relative path → sha256 of its bytes)."""
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.rglob("*")) if path.is_file()}


# ---- faults: each takes (out, monkeypatch, files) and damages the copy or patches the process ----

def truncate(relative: str, keep: int = 20) -> Callable:
    def fault(out, monkeypatch, files):
        path = out / relative
        path.write_bytes(path.read_bytes()[:keep])
    return fault


def overwrite(relative: str, content: str) -> Callable:
    def fault(out, monkeypatch, files):
        (out / relative).write_text(content)
    return fault


def read_only_folder(name: str) -> Callable:
    """A folder in which no file can be created (patched in: root ignores permission bits)."""
    def fault(out, monkeypatch, files):
        import tempfile

        folder = files / name
        folder.mkdir()
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return fault


def write_file(name: str, content: bytes | str) -> Callable:
    def fault(out, monkeypatch, files):
        path = files / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return fault


def prompt_file(name: str, data: object) -> Callable:
    return write_file(name, json.dumps(data))


def lock_file(content: str, age_seconds: float = 60.0) -> Callable:
    def fault(out, monkeypatch, files):
        path = out / ".results.zarr.lock"
        path.write_text(content)
        old = os.path.getmtime(path) - age_seconds
        os.utime(path, (old, old))
        monkeypatch.setenv("SAEMA_LOCK_TIMEOUT", "2")
    return fault


def interrupted_swap(group: str) -> Callable:
    def fault(out, monkeypatch, files):
        (out / "results.zarr" / group).rename(out / "results.zarr" / f".old-{group}")
    return fault


def delete_chunk(relative: str) -> Callable:
    def fault(out, monkeypatch, files):
        (out / relative).unlink()
    return fault


def refuse_writes(match: str, code: int = errno.ENOSPC) -> Callable:
    """Writes of zarr stores whose path contains `match`, and of local chunk files, fail with `code`."""
    def fault(out, monkeypatch, files):
        import xarray as xr

        from storage import chunk_files

        original = xr.Dataset.to_zarr

        def to_zarr(self, store=None, *args, **kwargs):
            if match in str(store):
                raise OSError(code, os.strerror(code), str(store))
            return original(self, store, *args, **kwargs)

        def write(self, index, values):
            raise OSError(code, os.strerror(code), f"{self.folder}/c/{index}")

        monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr)
        if match == "chunks":
            monkeypatch.setattr(chunk_files.ChunkFile, "write", write)
    return fault


def read_only_lock(out, monkeypatch, files):
    """The store's folder refuses new files (root ignores permission bits, so the refusal is patched in)."""
    real_open = os.open

    def guarded(path, flags, *args, **kwargs):
        if str(path).endswith(".results.zarr.lock") and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


@dataclass
class Row:
    name: str
    argv: list[str]
    code: int
    message: str = ""
    fault: Callable | None = None
    store: str = "same"  # as the fault left it — same: byte for byte; kept: those files unchanged, new ones
    # allowed (a resumable partial write, cache entries of finished work); repaired: byte for byte as
    # before the fault; changed: the command rewrites results (its `after` says how)
    base: bool = True  # append the arguments that reproduce the built store
    after: Callable | None = None  # extra check: (out, stdout+stderr) -> None
    extra: list[str] = field(default_factory=list)


def _seeds_per_concept(out, before, output):
    from storage.results import read_group

    ds = read_group(str(out), "stratification").load()
    seeds = ds["param_base_seed"].squeeze().to_series().to_dict()
    assert seeds == {"days": "3", "planets": "0"}, seeds
    assert ds.attrs["base_seed"].startswith("differs between cells")
    assert set(ds.noise.values) == {0.0, 0.1, 1.0, 0.5}  # extended along the new level
    assert "now computed with base_seed=3" in output


def _restored(relative: str) -> Callable:
    def check(out, before, output):
        assert (out / relative).exists()
    return check


def _only_its_batch(relative: str) -> Callable:
    """The lost chunk is back, and only its batch was re-extracted: every other chunk file (the other
    batches, the other concept, the corpus) keeps the modification time of the pristine copy."""
    def check(out, before, output):
        pristine = out.parent / "pristine"
        rewritten = [str(path.relative_to(out)) for path in (out / "activations").rglob("*")
                     if path.is_file() and "/c/" in str(path) and str(path.relative_to(out)) != relative
                     and path.stat().st_mtime_ns != (pristine / path.relative_to(out)).stat().st_mtime_ns]
        assert (out / relative).exists()
        batch_1 = re.compile(rf"{re.escape(CONCEPT_GROUP)}/\w+/c/1(/0)?$")
        assert all(batch_1.match(path) for path in rewritten), rewritten[:5]
    return check


ROWS = [
    # -- the stores --------------------------------------------------------------------------------
    Row("results root metadata truncated", ["stratify", "--noise-levels", "0", "1", "--replicates", "1"], 2,
        "results.zarr/zarr.json is corrupt", truncate("results.zarr/zarr.json")),
    Row("results group metadata truncated", ["run"], 2, "stratification/zarr.json is corrupt",
        truncate("results.zarr/stratification/zarr.json")),
    Row("results array metadata garbled", ["run"], 2, "rank/zarr.json is corrupt",
        overwrite("results.zarr/stratification/rank/zarr.json", "[1, 2]")),
    Row("activation store metadata truncated", ["extract"], 2, "bert.zarr/zarr.json is corrupt",
        truncate("activations/bert.zarr/zarr.json")),
    Row("concept group metadata truncated", ["train-sae"], 2, "days/zarr.json is corrupt",
        truncate("activations/bert.zarr/concepts/days/zarr.json")),
    Row("query of a store with a truncated group", ["query", "--out", "{out}", "--group", "strata"], 2,
        "strata/zarr.json is corrupt", truncate("results.zarr/strata/zarr.json"), base=False),
    Row("interrupted swap, then query", ["query", "--out", "{out}", "--group", "structure", "--limit", "2"], 0,
        "", interrupted_swap("structure"), base=False, store="repaired", after=_restored("results.zarr/structure/zarr.json")),
    Row("interrupted swap, then query of another group", ["query", "--out", "{out}", "--group", "strata"], 0, "",
        interrupted_swap("stratification"), base=False, store="repaired", after=_restored("results.zarr/stratification/zarr.json")),
    Row("deleted activation chunk is re-extracted", ["extract"], 0, "", delete_chunk(f"{CONCEPT_GROUP}/resid/c/1/0"),
        store="repaired", after=_only_its_batch(f"{CONCEPT_GROUP}/resid/c/1/0")),
    Row("deleted coordinate chunk is re-extracted", ["extract"], 0, "",
        delete_chunk(f"{CONCEPT_GROUP}/token_id/c/0"), store="repaired", after=_restored(f"{CONCEPT_GROUP}/token_id/c/0")),
    # -- locks -------------------------------------------------------------------------------------
    Row("empty lock file, fully cached stage", ["train-sae"], 0, "", lock_file("")),
    Row("lock of a dead process, fully cached stage", ["train-sae"], 0, "",
        lock_file(json.dumps({"pid": 999_999_999, "host": os.uname().nodename}))),
    Row("lock held by a live process, writing stage", ["stratify", "--noise-levels", "0", "1", "--replicates", "1"],
        2, "being written by pid 1 on", lock_file(json.dumps({"pid": 1, "host": os.uname().nodename,
                                                               "since": "2026-12-01 00:00:00"})), store="kept"),
    Row("read-only store, fully cached stage", ["train-sae"], 0, "", read_only_lock),
    # -- other parameters for some cells ---------------------------------------------------------------
    Row("one concept re-run with another seed", ["stratify", "--concepts", "days", "--noise-seed", "3",
                                                 "--noise-levels", "0", "0.5"], 0, store="changed",
        after=_seeds_per_concept),
    # -- disk full -----------------------------------------------------------------------------------
    Row("disk full during the results swap", ["stratify", "--noise-levels", "0", "1", "--replicates", "1"], 1,
        "no space left on device", refuse_writes(".new-stratification"), store="kept"),
    Row("disk full during extraction", ["extract", "--concepts", "days", "planets", "months"], 1,
        "no space left on device", refuse_writes("chunks"), store="kept"),
    Row("report into a read-only folder", ["report", "--out", "{out}", "--output", "{files}/ro/report.html"], 1,
        "permission denied", read_only_folder("ro"), base=False),
    # -- the model and its hooks ---------------------------------------------------------------------
    Row("hook beyond the last block", ["run", "--hooks", "blocks.9.hook_resid_post"], 2, "(3 blocks)"),
    Row("hook of an unknown kind", ["run", "--hooks", "blocks.1.hook_mlp_out"], 2, "valid hooks"),
    Row("hook name not TransformerLens style", ["run", "--hooks", "layer1"], 2, "does not exist"),
    Row("model folder missing", ["run", "--model", "/nonexistent/model"], 2, "does not exist"),
    Row("model folder without config", ["run", "--model", "{files}"], 2, "no config.json"),
    Row("extract with two models", ["extract", "--model", "a", "b"], 2, "takes one --model"),
    Row("corpus sequences longer than the model", ["run", "--corpus-seq-len", "1000"], 2, "256 positions"),
    # -- prompts and concepts ------------------------------------------------------------------------
    Row("unknown built-in concept", ["run", "--concepts", "rivers"], 2, "unknown built-in concept 'rivers'"),
    Row("prompt file missing", ["run", "--prompts", "{files}/missing.json", "--concepts", "x"], 2, "missing.json"),
    Row("prompt file not UTF-8", ["run", "--prompts", "{files}/latin.json", "--concepts", "colours"], 2,
        "latin.json is not UTF-8", write_file("latin.json", '{"cafes": ["le caf\xe9"]}'.encode("latin-1"))),
    Row("prompt file not JSON", ["run", "--prompts", "{files}/bad.json", "--concepts", "colours"], 2,
        "bad.json is not valid json", write_file("bad.json", "{cafes: [")),
    Row("prompt file empty", ["run", "--prompts", "{files}/empty.json", "--concepts", "colours"], 2, "empty.json is empty",
        write_file("empty.json", "  \n")),
    Row("prompt file a list", ["run", "--prompts", "{files}/list.json", "--concepts", "colours"], 2, "not a mapping",
        prompt_file("list.json", ["a", "b"])),
    Row("concept name with a slash", ["run", "--prompts", "{files}/slash.json", "--concepts", "colours"], 2,
        "concept name 'a/b' is not allowed", prompt_file("slash.json", {"a/b": ["hello world"] * 3})),
    Row("concept name starting with a dot", ["run", "--prompts", "{files}/dot.json", "--concepts", "colours"], 2,
        "concept name '.hidden' is not allowed", prompt_file("dot.json", {".hidden": ["hello world"]})),
    Row("concept with no prompts", ["run", "--prompts", "{files}/none.json", "--concepts", "colours"], 2, "has no prompts",
        prompt_file("none.json", {"colours": []})),
    Row("concept prompts not text", ["run", "--prompts", "{files}/num.json", "--concepts", "colours"], 2,
        "must be a list of text", prompt_file("num.json", {"colours": {"prompts": [1, 2]}})),
    Row("concept not in the prompt file", ["run", "--prompts", "{files}/ok.json", "--concepts", "shapes"], 2,
        "['shapes'] are not in", prompt_file("ok.json", {"colours": ["red and blue"]})),
    Row("prompt longer than the model takes", ["run", "--prompts", "{files}/long.json", "--concepts", "colours"], 2,
        "prompt 2", prompt_file("long.json", {"colours": ["red", " ".join(["blue green red"] * 200)]})),
    Row("every word a filler", ["run", "--prompts", "{files}/fill.json", "--concepts", "colours"], 2, "no analysed tokens",
        prompt_file("fill.json", {"colours": {"prompts": ["red blue"], "fillers": ["red", "blue"]}})),
    Row("unknown concept source", ["run", "--concept-source", "wikipedia"], 2, "'wikipedia' is none of these"),
    Row("corpus file missing", ["run", "--corpus", "/nonexistent/corpus.txt"], 2, "does not exist"),
    Row("corpus contexts without a corpus", ["run", "--concept-source", "corpus", "--corpus", "none"], 2,
        "--corpus is none"),
    Row("streamed corpus without a corpus", ["run", "--stream-corpus", "--corpus", "none"], 2,
        "--stream-corpus streams the training corpus, but --corpus is none"),
    # -- SAE settings ----------------------------------------------------------------------------------
    Row("k wider than the SAE", ["run", "--k", "500"], 2, "more than the SAE's 128 latents"),
    Row("--sae for a hook not analysed", ["run", "--sae", "blocks.0.hook_resid_post={files}"], 2,
        "not analysed: blocks.0.hook_resid_post"),
    Row("--sae checkpoint missing", ["run", "--sae", f"{HOOK}=/nonexistent/sae"], 2, "no SAE checkpoint at"),
    Row("--sae without a path", ["run", "--sae", HOOK], 2, "HOOK=PATH"),
    Row("zero expansion", ["run", "--expansion", "0"], 2, "expansion must be ≥ 1"),
    Row("zero training steps", ["run", "--steps", "0"], 2, "n_steps must be ≥ 1"),
    # -- analysis settings ---------------------------------------------------------------------------
    Row("negative noise level", ["run", "--noise-levels", "-1", "0"], 2, "noise level -1.0"),
    Row("zero replicates", ["run", "--replicates", "0"], 2, "replicates"),
    Row("zero corpus tokens", ["run", "--corpus-max-tokens", "0"], 2, "corpus_max_tokens must be ≥ 1"),
    Row("tiny HDBSCAN clusters", ["run", "--min-cluster-size", "1"], 2, "min_cluster_size"),
    Row("zero workers", ["run", "--workers", "0"], 2, "workers"),
    Row("zero encoding budget", ["run", "--encode-elements", "0"], 2, "--encode-elements must be ≥ 1"),
    # -- reading results -----------------------------------------------------------------------------
    Row("query of a folder without results", ["query", "--out", "{files}/nowhere"], 2, "no results at",
        base=False),
    Row("query of an unknown concept", ["query", "--out", "{out}", "--group", "strata", "--concept", "rivers"], 2,
        "rivers", base=False),
    Row("query selection not DIM=VALUE", ["query", "--out", "{out}", "--group", "strata", "--sel", "noise"], 2,
        "DIM=VALUE", base=False),
    Row("query selection on a numeric dimension", ["query", "--out", "{out}", "--group", "strata",
                                                    "--sel", "noise=0.1", "space=latent"], 0, base=False),
    Row("query selection on an unknown dimension", ["query", "--out", "{out}", "--group", "strata",
                                                    "--sel", "colour=red"], 2, "no dimension colour", base=False),
]


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row: Row, built, tmp_path, monkeypatch, capsys, caplog):
    pristine, out, model, corpus = built
    files = tmp_path / "files"
    shutil.rmtree(out)
    shutil.copytree(pristine, out, symlinks=True)
    files.mkdir()
    pristine_files = snapshot(out)
    if row.fault:
        row.fault(out, monkeypatch, files)
    before = pristine_files if row.store == "repaired" else snapshot(out)
    argv = [arg.format(out=out, files=files) for arg in row.argv]
    command, options = argv[0], argv[1:]
    # argparse keeps the last value of an option: the row's options override the built store's.
    full = [command, *(tiny_run_args(out, model, corpus, command) if row.base else []), *options]
    capsys.readouterr()
    code = main(full)
    output = capsys.readouterr()
    # saema's warnings and Prefect's run logs go through logging. Dask's own shutdown chatter (a
    # CommClosedError traceback when a local cluster closes under load) is not about the input.
    logged = "\n".join(caplog.handler.format(record) for record in caplog.records
                       if record.name.startswith(("saema", "prefect")))
    text = output.out + output.err + logged
    assert code == row.code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    if row.message:
        error_lines = [line for line in output.err.splitlines() if line.startswith(f"saema {command}: error:")]
        assert len(error_lines) == 1 and row.message.lower() in error_lines[0].lower(), text[-3000:]
    monkeypatch.undo()  # faults patched into this process must not affect the check below
    after = snapshot(out)
    if row.store == "kept":
        assert {path: after.get(path) for path in before} == before, _difference(before, after)
    elif row.store != "changed":
        assert after == before, _difference(before, after)
    assert not [path for path in set(after) - set(before) if ".new-" in path or path.endswith(".lock")]
    if row.after:
        row.after(out, before, text)


def _difference(before: dict[str, str], after: dict[str, str]) -> str:
    changed = [p for p in before if after.get(p) != before[p]]
    added = [p for p in after if p not in before]
    return f"changed or removed: {changed[:10]}; added: {added[:10]}"


def test_the_table_is_long_enough():
    assert len(ROWS) >= 40
