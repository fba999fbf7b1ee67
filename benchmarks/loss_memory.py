"""Peak memory and time of the loss's forward + backward through the LM heads: fused (trainer/head_loss.py, the
trial's default) against the unfused path it replaces (every position's logits, then `opsd_loss`).

Same inputs for both: one response of `--tokens` positions, the student's and the teacher's last hidden states
[1, T, H] and their own (untied) LM heads [V, H], Qwen3's vocabulary by default, the default loss settings
(reverse KL, top-20 + tail, token mean). The student's hidden states and head get gradients, the teacher's none.
The unfused variant drops its own names for the logits before the backward (opsd_step kept them until the next
micro batch), so its memory is if anything understated.

Each measurement is a fresh process: it builds the inputs (seeded), warms both variants up on 64 positions,
then runs its variant once, timed (wall clock and the process's CPU time, which other load on a shared
machine disturbs less), and reports its peak resident memory (ru_maxrss). A baseline process does the same
without the timed run; a variant's memory is its peak minus the baseline's, i.e. what the loss needs beyond
its inputs (the weight gradient included: both variants produce one). `--repeats` processes per variant, interleaved; medians are printed with the fused
to unfused ratios, and the largest differences of the loss and the gradients between the two variants (from
each variant's first run, its results saved to a temporary folder).

    .venv/bin/python benchmarks/loss_memory.py                      # V=151,936, T=4,096, H=2,048, float32
    .venv/bin/python benchmarks/loss_memory.py --tokens 512 --repeats 1 --chunk-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VARIANTS = ("baseline", "unfused", "fused")
GIB = 1024**3


def make_inputs(args: argparse.Namespace) -> dict:
    """The hidden states, heads and token ids of one response; logits of standard deviation ~3 (peaked)."""
    import torch

    from trainer.lm_head import LMHead

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    head_scale = 3.0 / args.hidden**0.5
    return {
        "student_hidden": randn(1, args.tokens, args.hidden),
        "teacher_hidden": randn(1, args.tokens, args.hidden),
        "student_head": LMHead(randn(args.vocab, args.hidden, scale=head_scale)),
        "teacher_head": LMHead(randn(args.vocab, args.hidden, scale=head_scale)),
        "ids": torch.randint(0, args.vocab, (1, args.tokens), generator=gen),
        "mask": torch.ones(1, args.tokens, dtype=torch.bool),
    }


def run_variant(variant: str, inputs: dict, args: argparse.Namespace):
    """Forward and backward of one variant; returns (loss, grad of the hidden states, grad of the head weight)."""
    import torch
    import torch.nn.functional as F

    from trainer.config import LossConfig
    from trainer.head_loss import opsd_loss_from_hidden
    from trainer.lm_head import LMHead
    from trainer.losses import opsd_loss

    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = inputs["student_head"].weight.requires_grad_(True)
    weight.grad = None
    teacher_hidden, teacher_head = inputs["teacher_hidden"], inputs["teacher_head"]
    ids, mask = inputs["ids"], inputs["mask"]
    options = LossConfig().model_dump(exclude={"chunk_size"})
    if variant == "unfused":  # what opsd_step did before: all logits, then the loss on them
        student_logits = F.linear(hidden, weight)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_head.weight)
        loss, _ = opsd_loss(student_logits, teacher_logits, ids, mask, **options, temperature=1.0)
        del student_logits, teacher_logits  # the graph keeps what the backward needs; the caller's names go
    elif variant == "fused":
        loss, _ = opsd_loss_from_hidden(hidden, teacher_hidden, ids, mask, student_head=LMHead(weight),
                                        teacher_head=teacher_head, chunk_size=args.chunk_size, **options,
                                        temperature=1.0)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def child(args: argparse.Namespace) -> None:
    """One measurement process: prints one JSON line."""
    import torch

    # Every process, the baseline too, first runs both variants at a small size (its own small tensors, freed
    # before the measurement), so that libraries and kernels are loaded alike.
    small = argparse.Namespace(**{**vars(args), "tokens": 64, "vocab": 4096})
    for variant in ("unfused", "fused"):
        run_variant(variant, make_inputs(small), small)
    inputs = make_inputs(args)
    result = {"variant": args.child, "seconds": 0.0, "cpu_seconds": 0.0}
    if args.child != "baseline":
        started, cpu_started = time.perf_counter(), time.process_time()
        loss, grad_hidden, grad_weight = run_variant(args.child, inputs, args)
        result["seconds"] = time.perf_counter() - started
        result["cpu_seconds"] = time.process_time() - cpu_started
    # Linux reports ru_maxrss in KiB.
    result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.child != "baseline" and args.save:
        torch.save({"loss": loss, "grad_hidden": grad_hidden, "grad_weight": grad_weight}, args.save)
    print(json.dumps(result), flush=True)


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what can be allocated without pushing other processes out."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def unfused_estimate(args: argparse.Namespace) -> int:
    """A generous estimate of the unfused process's peak: the inputs, the weight gradient and six float32
    [T, V] tensors (logits, scaled copies, the tail's masked copies, their gradients)."""
    size = 2 if args.dtype == "bfloat16" else 4
    return 3 * args.vocab * args.hidden * size + 6 * args.tokens * args.vocab * 4


def measure(variant: str, args: argparse.Namespace, save: Path | None) -> dict:
    # On a shared machine a process that does not fit is killed, or worse pushes another one out: refuse first.
    if variant == "unfused" and not args.force and available_bytes() < unfused_estimate(args):
        sys.exit(f"the unfused variant may need {unfused_estimate(args) / GIB:.1f} GiB; only "
                 f"{available_bytes() / GIB:.1f} GiB are available (--force runs it anyway)")
    cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size)]
    if save is not None:
        cmd += ["--save", str(save)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(unfused: Path, fused: Path) -> dict[str, tuple[float, float]]:
    """name -> (max |fused - unfused|, that over max |unfused|)."""
    import torch

    want, got = torch.load(unfused), torch.load(fused)
    out = {}
    for name in ("loss", "grad_hidden", "grad_weight"):
        diff = float((got[name].double() - want[name].double()).abs().max())
        out[name] = (diff, diff / float(want[name].double().abs().max()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936, help="V (default: Qwen3's)")
    parser.add_argument("--tokens", type=int, default=4096, help="T, response positions")
    parser.add_argument("--hidden", type=int, default=2048, help="H (Qwen3-1.7B's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="positions per chunk of the fused loss (default: loss.chunk_size's default)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per variant")
    parser.add_argument("--fused-only", action="store_true",
                        help="measure the baseline and the fused variant only (when the unfused one cannot fit)")
    parser.add_argument("--force", action="store_true", help="run the unfused variant without the memory check")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_size is None:
        from trainer.config import LossConfig

        args.chunk_size = LossConfig().chunk_size
    if args.child:
        child(args)
        return

    print(f"V={args.vocab:,} T={args.tokens:,} H={args.hidden:,} {args.dtype}, fused chunk {args.chunk_size} "
          f"positions; {os.cpu_count()} CPUs; {args.repeats} process(es) per variant", flush=True)
    variants = ("baseline", "fused") if args.fused_only else VARIANTS
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="loss-memory-") as tmp:
        saved = {variant: Path(tmp) / f"{variant}.pt" for variant in ("unfused", "fused")}
        for repeat in range(args.repeats):
            for variant in variants:
                run = measure(variant, args, saved.get(variant) if repeat == 0 and not args.fused_only else None)
                runs[variant].append(run)
                print(f"  {variant:8s} run {repeat + 1}: peak {run['peak_bytes'] / GIB:6.2f} GiB  "
                      f"{run['seconds']:7.2f} s wall  {run['cpu_seconds']:7.2f} s CPU", flush=True)
        diffs = None if args.fused_only else differences(saved["unfused"], saved["fused"])

    baseline = statistics.median(r["peak_bytes"] for r in runs["baseline"])
    if args.fused_only:
        fused = runs["fused"]
        print(f"\nbaseline process {baseline / GIB:.2f} GiB; fused: "
              f"{(statistics.median(r['peak_bytes'] for r in fused) - baseline) / GIB:.2f} GiB beyond inputs, "
              f"{statistics.median(r['seconds'] for r in fused):.2f} s wall, "
              f"{statistics.median(r['cpu_seconds'] for r in fused):.2f} s CPU")
        return
    extra = {v: statistics.median(r["peak_bytes"] for r in runs[v]) - baseline for v in ("unfused", "fused")}
    wall = {v: statistics.median(r["seconds"] for r in runs[v]) for v in ("unfused", "fused")}
    cpu = {v: statistics.median(r["cpu_seconds"] for r in runs[v]) for v in ("unfused", "fused")}
    print(f"\nbaseline process (inputs, warm-up): {baseline / GIB:.2f} GiB; medians of {args.repeats} process(es)")
    print(f"{'':14s}{'memory beyond inputs':>22s}{'fwd+bwd wall':>16s}{'fwd+bwd CPU':>16s}")
    for variant in ("unfused", "fused"):
        print(f"{variant:14s}{extra[variant] / GIB:18.2f} GiB{wall[variant]:14.2f} s{cpu[variant]:14.2f} s")
    print(f"{'fused/unfused':14s}{extra['fused'] / extra['unfused']:22.3f}{wall['fused'] / wall['unfused']:16.3f}"
          f"{cpu['fused'] / cpu['unfused']:16.3f}")
    # Both variants must return the head's weight gradient [V, H]; what each needs besides it is the loss's own.
    gradient = args.vocab * args.hidden * (2 if args.dtype == "bfloat16" else 4)
    print(f"without the weight gradient both return ({gradient / GIB:.2f} GiB): unfused "
          f"{(extra['unfused'] - gradient) / GIB:.2f} GiB, fused {(extra['fused'] - gradient) / GIB:.2f} GiB, "
          f"ratio {(extra['fused'] - gradient) / (extra['unfused'] - gradient):.3f}")
    print("\nfused vs unfused (max abs difference, and relative to the largest unfused entry):")
    for name, (diff, rel) in diffs.items():
        print(f"  {name:12s} {diff:.3e}  {rel:.3e}")


if __name__ == "__main__":
    main()
