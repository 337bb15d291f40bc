"""CPU speed of the EfficientNet-Lite backbones (segany-lite's image encoder trunk).

Inference: batch 1, square inputs, ``torch.inference_mode``, fp32 and bf16 autocast, with and
without :meth:`EfficientNetLite.fuse_bn`. Training: forward + backward, batch 4, BN in train
mode. Each number is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones.
Random weights (speed does not depend on them), so no weight package is needed.

    .venv/bin/python benchmarks/backbone_speed.py
    .venv/bin/python benchmarks/backbone_speed.py --variants lite0 --sizes 512 --channels-last

On a small shared machine, the environment matters more than the model (set it before Python
starts): ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP threads competing with other processes made
lite0 at 128 px take 1.8 s instead of 12 ms on 2 busy cores), and glibc keeping freed memory
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``) so that large activations
are not page-faulted in afresh on every forward.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from segany.modeling.efficientnet import EfficientNetLite, build_efficientnet_lite


def _time(fn: Callable[[], object], *, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, min) seconds over ``repeats`` runs; the min shows what contention hides."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _autocast(dtype: str) -> contextlib.AbstractContextManager[object]:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _models(variant: str, channels_last: bool) -> Iterator[tuple[str, EfficientNetLite]]:
    torch.manual_seed(0)
    model = build_efficientnet_lite(variant).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    yield "bn", model
    yield "fused", model.fuse_bn()


def bench_inference(args: argparse.Namespace) -> None:
    print(f"\n## inference, batch 1, median (min) of {args.repeats}, ms")
    print(f"{'variant':8} {'size':>5} {'dtype':>5} {'bn':>15} {'fused':>15} {'speedup':>8}")
    for variant in args.variants:
        for size in args.sizes:
            x = torch.randn(1, 3, size, size)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for dtype in args.dtypes:
                row: dict[str, tuple[float, float]] = {}
                for kind, model in _models(variant, args.channels_last):

                    def run(
                        model: EfficientNetLite = model, dtype: str = dtype, x: torch.Tensor = x
                    ) -> object:
                        with torch.inference_mode(), _autocast(dtype):
                            return model(x)

                    row[kind] = _time(run, warmup=args.warmup, repeats=args.repeats)
                (bn, bn_min), (fused, fused_min) = row["bn"], row["fused"]
                print(
                    f"{variant:8} {size:>5} {dtype:>5} {1e3 * bn:>7.1f} ({1e3 * bn_min:>5.1f}) "
                    f"{1e3 * fused:>7.1f} ({1e3 * fused_min:>5.1f}) {bn / fused:>7.2f}x",
                    flush=True,
                )


def bench_training(args: argparse.Namespace) -> None:
    size, batch = args.train_size, args.train_batch
    print(
        f"\n## forward + backward, batch {batch}, {size} px, train mode, "
        f"median (min) of {args.repeats}"
    )
    print(f"{'variant':8} {'dtype':>5} {'s/step':>14} {'images/s':>9}")
    for variant in args.train_variants:
        torch.manual_seed(0)
        model = build_efficientnet_lite(variant).train()
        x = torch.randn(batch, 3, size, size)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for dtype in args.dtypes:

            def step(
                model: EfficientNetLite = model, dtype: str = dtype, x: torch.Tensor = x
            ) -> None:
                model.zero_grad(set_to_none=True)
                with _autocast(dtype):
                    feats = model(x)
                    loss = sum(f.float().square().mean() for f in feats)
                loss.backward()  # type: ignore[union-attr]

            sec, sec_min = _time(step, warmup=1, repeats=args.repeats)
            print(
                f"{variant:8} {dtype:>5} {sec:>6.2f} ({sec_min:>5.2f}) {batch / sec:>9.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["lite0", "lite1", "lite2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--train-variants", nargs="*", default=["lite0"])
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=4)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, channels_last={args.channels_last}"
    )
    bench_inference(args)
    if args.train_variants:
        bench_training(args)


if __name__ == "__main__":
    main()
