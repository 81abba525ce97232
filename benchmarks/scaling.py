"""Data-parallel scaling of :func:`pyro_vae.fit`: training throughput (data points per second) with 1, 2, ...
processes on the CPU (gloo) and, when present, one process per GPU (NCCL).

Each process count runs in freshly spawned workers joined by a process group on loopback, exactly as
``torchrun --nproc_per_node=N -m pyro_vae train`` would run them. Two modes:

- ``strong``: the same global batch (``--batch-size``) shared out among the processes: the optimization is
  the single-process one, each process does ``1/N`` of the work per step.
- ``weak``: the same batch per process (global batch ``N * --batch-size``): more data per step, as when one
  adds GPUs and keeps each one equally busy.

Throughput is the number of training points over the median seconds of the timed epochs (the first epoch,
with its one-off checks and warm-up, is not timed). On the CPU every process gets the same number of threads
(``--threads`` divided by the largest process count), so the comparison is between processes, not between
thread pools; ``--split-threads`` instead gives one process all the threads and N processes 1/N each (on a
busy machine OpenMP thread pools lose much more than processes do, which exaggerates the speed-up).
The data are synthetic binary images of MNIST's shape by default (throughput does not depend on the values);
``--data mnist --data-dir DIR`` uses the real files.

    python benchmarks/scaling.py --device auto                  # CPU with 1 and 2 processes, GPUs when present
    python benchmarks/scaling.py --quick --out /tmp/scaling     # CPU smoke run, under a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(cfg: dict[str, Any]) -> torch.Tensor:
    import pyro_vae

    if cfg["data"] == "synthetic":
        g = torch.Generator().manual_seed(0)
        return (torch.rand(cfg["n"], 784, generator=g) > 0.8).float()
    splits = pyro_vae.data.load(cfg["data"], cfg["data_dir"], binarize_mode="static")
    return splits.train.x.flatten(1)[: cfg["n"]]


def _threads(cfg: dict[str, Any], world: int) -> int:
    """Threads per process: ``--threads`` split among the processes with ``--split-threads``, else the same
    for every process count (``--threads`` divided by the largest count), so the comparison is between
    processes, not between thread pools."""
    return max(1, cfg["threads"] // (world if cfg["split_threads"] else cfg["max_procs"]))


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    import datetime as dt

    import pyro
    import torch.distributed as tdist

    import pyro_vae

    try:
        cuda = cfg["device"] == "cuda"
        if not cuda:
            torch.set_num_threads(_threads(cfg, world))
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1:
            tdist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                     rank=rank, world_size=world, timeout=dt.timedelta(minutes=10))
        x = _load(cfg)
        pyro.set_rng_seed(0)
        vae = pyro_vae.VAE((x.shape[1],), cfg["z_dim"], hidden=cfg["hidden"], likelihood="bernoulli")
        batch = cfg["batch_size"] * (world if cfg["mode"] == "weak" else 1)
        hist = pyro_vae.fit(vae, x, epochs=cfg["epochs"], batch_size=batch, lr=1e-3, device=device, seed=0,
                            progress=False, elbo="meanfield")
        if rank == 0:
            seconds = hist["seconds"][1:] or hist["seconds"]
            Path(out, "result.json").write_text(json.dumps({
                "seconds_per_epoch": seconds, "global_batch": batch,
                "final_train_elbo": hist["train_elbo"][-1]}))
        if world > 1:
            tdist.barrier()
            tdist.destroy_process_group()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_one(world: int, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, out), daemon=True) for r in range(world)]
        start = time.perf_counter()
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(max(1.0, timeout - (time.perf_counter() - start)))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        errors = [f.read_text() for f in Path(out).glob("rank*.err")]
        if errors or not Path(out, "result.json").is_file():
            raise RuntimeError(f"{world} process(es) failed:\n" + "\n".join(errors or ["timed out"]))
        res = json.loads(Path(out, "result.json").read_text())
    sec = statistics.median(res["seconds_per_epoch"])
    return {"processes": world, "mode": cfg["mode"], "device": cfg["device"], "global_batch": res["global_batch"],
            "seconds_per_epoch": res["seconds_per_epoch"], "median_seconds_per_epoch": sec,
            "points_per_s": cfg["n"] / sec, "final_train_elbo": res["final_train_elbo"],
            "threads_per_process": None if cfg["device"] == "cuda" else _threads(cfg, world)}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode]
        ax.plot([r["processes"] for r in sel], [r["points_per_s"] for r in sel], "o-", label=mode)
    ax.set_xlabel("processes")
    ax.set_ylabel("training points / s")
    ax.set_xticks(sorted({r["processes"] for r in rows}))
    ax.set_title(title, fontsize=9)
    ax.legend(title="batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--procs", type=int, nargs="+", default=None,
                   help="process counts (default 1 2 on the CPU; 1, 2, 4, ... up to the GPU count on CUDA)")
    p.add_argument("--modes", nargs="+", default=["strong", "weak"], choices=("strong", "weak"))
    p.add_argument("--data", default="synthetic", help="synthetic (MNIST-shaped), digits, mnist, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=60000, help="training points")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (strong) or per process (weak)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; all but the first are timed")
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, nargs="+", default=[400])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    p.add_argument("--split-threads", action="store_true",
                   help="give one process all --threads and N processes --threads / N each (default: every "
                        "process gets --threads / max(--procs), the same in every run)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per process count")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 3072 points, 2 epochs, strong scaling")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the workers are stopped with this process

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and device != "cuda":
        p.error("--device cuda without a GPU")
    if args.quick:
        device, args.n, args.epochs, args.modes, args.timeout = "cpu", 3072, 2, ["strong"], 300.0
    if args.procs is None:
        if device == "cuda":
            gpus = torch.cuda.device_count()
            args.procs = sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k <= gpus], gpus})
        else:
            args.procs = [1, 2]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for mode in args.modes:
        for world in args.procs:
            cfg = {"device": device, "mode": mode, "data": args.data, "data_dir": args.data_dir, "n": args.n,
                   "batch_size": args.batch_size, "epochs": args.epochs, "z_dim": args.z_dim,
                   "hidden": args.hidden, "threads": args.threads, "split_threads": args.split_threads,
                   "max_procs": max(args.procs)}
            row = run_one(world, cfg, args.timeout)
            base = next((r for r in rows if r["mode"] == mode and r["processes"] == 1), row)
            row["speedup"] = row["points_per_s"] / base["points_per_s"]
            rows.append(row)
            print(f"{mode:6s} {world:2d} proc  batch {row['global_batch']:5d}  "
                  f"{row['median_seconds_per_epoch']:8.2f} s/epoch  {row['points_per_s']:10.0f} points/s  "
                  f"x{row['speedup']:.2f}", flush=True)

    import pyro

    meta = {
        "benchmark": "scaling", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "gpus": torch.cuda.device_count() if device == "cuda" else 0, "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__, "pyro": pyro.__version__, "quick": args.quick,
        "backend": "nccl" if device == "cuda" else "gloo",
        "load_average_before_after": [load_before, os.getloadavg() if hasattr(os, "getloadavg") else None],
        "config": {k: getattr(args, k) for k in ("data", "n", "batch_size", "epochs", "z_dim", "hidden", "threads",
                                                 "split_threads")},
        "model": "MLP VAE, Bernoulli likelihood, TraceMeanField_ELBO, Adam lr 1e-3",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"scaling_{device}" + ("_quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    plot(rows, out / f"{name}.png", f"pyro-vae fit, {device} ({meta['backend']}), {args.n} points, "
                                    f"batch {args.batch_size}")
    print("| mode | processes | global batch | s / epoch | points / s | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['processes']} | {r['global_batch']} | {r['median_seconds_per_epoch']:.2f} | "
              f"{r['points_per_s']:.0f} | {r['speedup']:.2f} |")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
