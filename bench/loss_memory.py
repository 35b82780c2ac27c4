"""Peak memory of the token-sum loss, forward + backward: full logits against chunked_supervised_token_sums.

    python bench/loss_memory.py                  # CUDA: Falcon-7B's vocabulary 65024, hidden 4544, 4 x 2048, bf16
    python bench/loss_memory.py --device cpu     # CPU: vocabulary 65024, hidden 512, 4 x 2048 tokens, fp32

"full" is what training does with the model's logits: hidden @ W.T for every token, then
`supervised_token_sums` (fp32 log-softmax over the vocabulary) and its backward. "chunked" is
`chunked_supervised_token_sums` on the same hidden states and weight. Each variant runs in a fresh process, so
that its peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the peak resident set size
(getrusage), each reported above the memory held once the inputs exist (hidden states, weight, labels).
`--supervised` sets the share of positions with a label (1.0: every position, the chunked path's worst case).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
DEFAULTS = {  # device: (batch, tokens, hidden, dtype)
    "cuda": (4, 2048, 4544, "bf16"),
    "cpu": (4, 2048, 512, "fp32"),
}


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Run one variant in this process; its peak memory above the inputs, its total peak and its time."""
    import torch

    sys.path.insert(0, str(REPO))
    from model_training.data.formatting import IGNORE_INDEX
    from model_training.training.loss import chunked_supervised_token_sums, supervised_token_sums

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens, args.hidden, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(args.vocab, args.hidden, generator=generator, device=device, dtype=dtype) * 0.02
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator, device=device)
    ignored = torch.rand(args.batch, args.tokens, generator=generator, device=device) >= args.supervised
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    baseline = _current(device)

    start = time.perf_counter()
    if args.variant == "full":
        loss, _ = supervised_token_sums(hidden @ weight.T, labels)
    else:
        loss, _ = chunked_supervised_token_sums(hidden, weight, labels, chunk_size=args.chunk_size)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak(device)
    return {"peak_over_inputs_mib": (peak - baseline) / MIB, "peak_mib": peak / MIB, "seconds": seconds}


def _current(device) -> int:
    """Bytes held now: allocated CUDA memory, or this process's resident set."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _peak(device) -> int:
    """Bytes at the peak so far: CUDA's allocator statistic, or the resident set's high-water mark."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--dtype", choices=["bf16", "fp32"])
    parser.add_argument("--vocab", type=int, default=65024)
    parser.add_argument("--supervised", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)  # the child's run
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(measure(args)))
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, default in zip(("batch", "tokens", "hidden", "dtype"), DEFAULTS[args.device]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    child = [sys.executable, __file__] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("device", "batch", "tokens", "hidden", "dtype", "vocab", "supervised", "chunk_size")
    ]
    results = {
        variant: json.loads(subprocess.run([*child, f"--variant={variant}"], check=True, capture_output=True,
                                           text=True).stdout)
        for variant in ("full", "chunked")
    }
    print(f"{args.device}: {args.batch} x {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, "
          f"{args.dtype}, {args.supervised:.0%} supervised, chunks of {args.chunk_size}")
    print(f"{'':24}{'full':>12}{'chunked':>12}")
    for key, label in (("peak_over_inputs_mib", "peak over inputs (MiB)"), ("peak_mib", "peak total (MiB)"),
                       ("seconds", "forward+backward (s)")):
        print(f"{label:24}" + "".join(f"{results[variant][key]:12.1f}" for variant in ("full", "chunked")))


if __name__ == "__main__":
    main()
