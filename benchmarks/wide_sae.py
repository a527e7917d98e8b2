"""The intervention stage with SAEs of 3 072 and 65 536 latents, in one run: time and peak memory.

For each width, a synthetic SAELens TopK checkpoint (k 32, random unit-norm decoder rows, encoder its
transpose) for MiniLM `blocks.3.hook_resid_post` is loaded with `--sae`, on the three default concepts.
Both widths share one activation store (`--out`, extracted once). Per width:

1. `saema structure …` brings the SAE stage (encode, evaluate) and the structure stage up to date;
2. `saema intervene …` then runs only the intervention stage (the rest is cached); its wall time minus
   that of a second, fully cached `saema intervene` is the intervention stage's time;
3. during (2) the resident memory of every process of the run (the CLI and its Dask workers) is sampled
   every 0.2 s; the peak of each process is reported.

`--no-dense` throughout (a dense control of 65 536 latents is a training job of its own), one UMAP seed.

    python benchmarks/wide_sae.py --out /tmp/wide [--widths 3072 65536] [--corpus-max-tokens 32768]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

HOOK = "blocks.3.hook_resid_post"
D_IN, K = 384, 32


def write_checkpoint(folder: Path, d_sae: int) -> Path:
    """A SAELens TopK folder with random unit-norm decoder rows and W_enc = W_decᵀ."""
    from saema_core.sae import SAEConfig, build_sae
    from storage.sae_checkpoints import save_sae

    if (folder / "cfg.json").exists():
        return folder
    sae = build_sae(SAEConfig(architecture="topk", d_in=D_IN, d_sae=d_sae, k=K,
                              metadata={"model_name": "all-MiniLM-L6-v2", "hook_name": HOOK}))
    gen = torch.Generator().manual_seed(d_sae)
    with torch.no_grad():
        rows = torch.randn(d_sae, D_IN, generator=gen)
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    save_sae(sae, folder)
    return folder


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_sampled(cmd: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of `cmd` and the peak RSS (MiB) of each process of its tree, sampled every 0.2 s."""
    peaks: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in _tree(proc.pid):
                try:
                    name = "cli" if p.pid == proc.pid else f"child {p.pid}"
                    peaks[name] = max(peaks.get(name, 0.0), p.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--widths", type=int, nargs="+", default=[3072, 65536])
    parser.add_argument("--corpus-max-tokens", type=int, default=32768)
    args = parser.parse_args()
    saema = [sys.executable, "-m", "saema.cli"]
    rows = []
    for width in args.widths:
        checkpoint = write_checkpoint(Path(args.out) / f"sae-w{width}", width)
        common = ["--out", args.out, "--hooks", HOOK, "--corpus-max-tokens", str(args.corpus_max_tokens),
                  "--no-dense", "--sae", f"{HOOK}={checkpoint}"]
        run_sampled([*saema, "structure", *common, "--umap-seeds", "42"])
        intervene = [*saema, "intervene", *common, "--umap-seeds", "42"]
        seconds, peaks = run_sampled(intervene)
        cached, _ = run_sampled(intervene)
        workers = [v for k, v in peaks.items() if k != "cli"]
        rows.append((width, seconds - cached, seconds, cached, peaks.get("cli", 0.0), max(workers, default=0.0)))
        print(f"d_sae {width}: intervention stage {seconds - cached:.1f} s (run {seconds:.1f} s, cached rerun "
              f"{cached:.1f} s); peak RSS CLI {peaks.get('cli', 0):.0f} MiB, largest worker "
              f"{max(workers, default=0):.0f} MiB", flush=True)
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            print(f"{row[0]} / {base[0]}: intervention stage time ratio {row[1] / base[1]:.2f}; worker peak "
                  f"{row[5] - base[5]:+.0f} MiB, CLI peak {row[4] - base[4]:+.0f} MiB")


if __name__ == "__main__":
    main()
