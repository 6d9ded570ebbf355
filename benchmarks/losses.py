"""Benchmark of the contrastive losses: time and peak extra memory of forward + backward.

Usage:
    python benchmarks/losses.py            # full run (64x64 and 128x128 local loss, B=4096 NT-Xent)
    python benchmarks/losses.py --quick    # 32x32 and 64x64, NT-Xent B=1024
    python benchmarks/losses.py --threads 1 --rounds 2

Every case runs in a fresh subprocess so that its peak memory is its own, and the
cases are interleaved over several rounds (min time) because the machine may be shared:
peak extra memory = peak RSS during one forward + backward (Linux VmHWM, reset
via /proc/self/clear_refs just before) minus RSS before it, with the inputs
already allocated. On CUDA it is torch.cuda.max_memory_allocated() minus the
memory allocated before. A tiny run of the same case comes first (library warm-up).
Wall time and process CPU time (all threads) are both reported: on a shared
machine the CPU time is the steadier figure.

Supervised local loss cases (B=4, two views, C=128, labels uniform in {1, 2, 3}
so that every pixel is an anchor, the worst case for the exact mode):
  exact, stride=4, block=32, naive (the full N x N formula with autograd, only
  where it fits in memory) and floor: the same-size similarity matmuls alone
  (forward Q K^T and the two backward products P K and P^T Q, in the same row
  chunks, no exp/log), i.e. what any exact method must at least compute.
NT-Xent: medcl's nt_xent vs a plain full-matrix cross-entropy version.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medcl.losses import nt_xent, supervised_local_contrastive  # noqa: E402
from medcl.losses import _lse  # noqa: E402

TAU = 0.1
B, C = 4, 128
MIB = 2**20


# --------------------------------------------------------------------------- memory probes
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakMemory:
    """Peak extra memory of the enclosed block (CPU: RSS high-water mark; CUDA: allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.extra = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.start = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.extra = _rss_bytes("VmHWM") - self.start


# --------------------------------------------------------------------------- the cases
def naive_supervised(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Methods 2b on the full N x N matrix with plain autograd."""
    f = F.normalize(features, dim=2).permute(0, 1, 3, 4, 2).reshape(-1, features.shape[2])
    y = labels.unsqueeze(1).expand(-1, 2, -1, -1).reshape(-1)
    n = y.shape[0]
    logits = (f / tau) @ f.T
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    log_prob = torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=1)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    anchor = (y > 0) & (n_pos > 0)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
    return per_anchor[anchor].mean()


def floor_matmuls(features: torch.Tensor) -> None:
    """The similarity matmuls of an exact forward + backward, in the same row chunks."""
    with torch.no_grad():
        f = F.normalize(features, dim=2).permute(0, 1, 3, 4, 2).reshape(-1, features.shape[2])
        rows = _lse._rows_per_chunk(f.shape[0], None, f.device)
        grad_k = torch.zeros_like(f)
        for i in range(0, f.shape[0], rows):
            torch.mm(f[i:i + rows], f.T)  # forward
        for i in range(0, f.shape[0], rows):
            p = torch.mm(f[i:i + rows], f.T)  # stands for the recomputed probabilities
            p @ f
            grad_k.addmm_(p.T, f[i:i + rows])


def plain_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The usual full-matrix SimCLR loss: (2B x 2B) logits, -inf diagonal, cross-entropy."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def run_case(kind: str, size: int, repeats: int, device: torch.device, warmup: bool = True) -> dict:
    """Run one case in this process; return time and peak extra memory."""
    if warmup:
        small = {"ntxent_plain": 16, "ntxent_medcl": 16, "block32": 32}.get(kind, 8)
        run_case(kind, small, 1, device, warmup=False)
    g = torch.Generator().manual_seed(0)
    if kind.startswith("ntxent"):
        z1 = torch.randn(size, C, generator=g).to(device).requires_grad_()
        z2 = torch.randn(size, C, generator=g).to(device).requires_grad_()
        fn = nt_xent if kind == "ntxent_medcl" else plain_nt_xent

        def step() -> None:
            fn(z1, z2, TAU).backward()
            z1.grad = z2.grad = None
    else:
        features = torch.randn(B, 2, C, size, size, generator=g).to(device).requires_grad_()
        labels = torch.randint(1, 4, (B, size, size), generator=g).to(device)
        modes = {"exact": {"mode": "exact"}, "stride4": {"mode": "stride", "stride": 4},
                 "block32": {"mode": "block", "block_size": 32}}

        def step() -> None:
            if kind == "floor":
                floor_matmuls(features.detach())
                return
            if kind == "naive":
                loss = naive_supervised(features, labels, TAU)
            else:
                loss = supervised_local_contrastive(features, labels, TAU, **modes[kind])
            loss.backward()
            features.grad = None

    times, cpu_times = [], []
    for r in range(repeats):
        with PeakMemory(device) as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        if r == 0:
            peak = mem.extra  # the first run measures memory
    return {"time_s": min(times), "cpu_s": min(cpu_times), "peak_extra_mib": peak / MIB, "repeats": repeats}


# --------------------------------------------------------------------------- driver
def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _spawn(kind: str, size: int, repeats: int, device: str, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--case", kind, "--size", str(size), "--repeats", str(repeats),
           "--device", device] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc={out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _merge(best: dict, res: dict) -> None:
    """Keep the minimum times and the maximum memory of repeated rounds in ``best``."""
    if "time_s" in res and "time_s" in best and res is not best:
        for key in ("time_s", "cpu_s"):
            best[key] = min(best[key], res[key])
        best["peak_extra_mib"] = max(best["peak_extra_mib"], res["peak_extra_mib"])


def _ratio(res: dict, floor: dict, key: str) -> str:
    return f"{res[key] / floor[key]:.2f}" if key in res and key in floor else "-"


def _fmt(res: dict | None, key: str, spec: str) -> str:
    if res is None or key not in res:
        return "-"
    return format(res[key], spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 and 64x64 maps, NT-Xent B=1024")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None,
                        help="fresh-process runs per case, interleaved; min time is reported "
                             "(default 3, 1 for N > 32768)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every case")
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.repeats, device)))
        return

    sizes = [32, 64] if args.quick else [32, 64, 128]
    nt_batch = 1024 if args.quick else 4096
    print(f"# medcl loss benchmark  {datetime.date.today()}  torch {torch.__version__}  device {device}  "
          f"threads {args.threads or torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"{platform.processor() or platform.machine()}")
    print(f"# command: python benchmarks/losses.py {' '.join(sys.argv[1:])}".rstrip())
    print("# time = min over rounds (one fresh process per case and round, cases interleaved); "
          "memory = max over rounds")
    print(f"# load average at start (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n## Supervised local contrastive loss (B=4, 2 views, C=128, tau=0.1, all pixels anchors)\n")
    print("| H x W | N | case | fwd+bwd time (s) | CPU time (s) | peak extra memory (MiB) | time / floor "
          "| CPU time / floor |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for size in sizes:
        n = B * 2 * size * size
        rounds = args.rounds or (3 if n <= 32768 else 1)
        kinds = ["floor", "exact", "stride4"] + (["block32"] if size >= 32 else [])
        matrix = n * n * 4
        # the autograd formula holds ~5 N x N float32 tensors at its peak
        naive_fits = matrix <= 8 * 2**30 and 5 * matrix <= 0.5 * _available_bytes()
        kinds += ["naive"] if naive_fits else []
        results: dict[str, dict] = {}
        for _ in range(rounds):
            for kind in kinds:
                res = _spawn(kind, size, 1, args.device, args.threads)
                best = results.setdefault(kind, res)
                _merge(best, res)
        floor = results.get("floor", {})
        for kind in kinds:
            res = results[kind]
            if "error" in res:
                print(f"| {size}x{size} | {n} | {kind} | failed: {res['error']} | - | - | - | - |")
                continue
            print(f"| {size}x{size} | {n} | {kind} | {res['time_s']:.3f} | {res['cpu_s']:.3f} | "
                  f"{res['peak_extra_mib']:.0f} | {_ratio(res, floor, 'time_s')} | {_ratio(res, floor, 'cpu_s')} |",
                  flush=True)
        if not naive_fits:
            print(f"| {size}x{size} | {n} | naive | skipped: N x N x 4 B = {matrix / 2**30:.1f} GiB; ~5 such "
                  f"tensors exceed half of the {_available_bytes() / 2**30:.1f} GiB available | - | - | - | - |",
                  flush=True)
        summary[size] = results

    print(f"\n## NT-Xent (B={nt_batch}, D=128, tau=0.1)\n")
    print("| implementation | fwd+bwd time (s) | CPU time (s) | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    nt: dict[str, dict] = {}
    for _ in range(args.rounds or 3):
        for kind in ("ntxent_plain", "ntxent_medcl"):
            res = _spawn(kind, nt_batch, 3, args.device, args.threads)
            _merge(nt.setdefault(kind, res), res)
    for kind, res in nt.items():
        print(f"| {kind.split('_')[1]} | {_fmt(res, 'time_s', '.3f')} | {_fmt(res, 'cpu_s', '.3f')} | "
              f"{_fmt(res, 'peak_extra_mib', '.0f')} |")

    print(f"\n# load average at end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n## Goals")
    ex = summary.get(64, {}).get("exact", {})
    fl = summary.get(64, {}).get("floor", {})
    if "time_s" in ex and "time_s" in fl:
        print(f"- exact at N=32768: peak extra {ex['peak_extra_mib']:.0f} MiB (goal <= 512): "
              f"{'met' if ex['peak_extra_mib'] <= 512 else 'MISSED'}")
        for key, what in (("time_s", "wall time"), ("cpu_s", "CPU time")):
            ratio = ex[key] / fl[key]
            print(f"- exact at N=32768: {what} {ratio:.2f}x the matmul floor (goal <= 2): "
                  f"{'met' if ratio <= 2 else 'MISSED'}")
    if all("time_s" in r for r in nt.values()):
        for key, what in (("time_s", "wall time"), ("cpu_s", "CPU time")):
            ratio = nt["ntxent_medcl"][key] / nt["ntxent_plain"][key]
            print(f"- nt_xent / plain {what}: {ratio:.2f} (goal <= 1): {'met' if ratio <= 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
