"""Forward + backward cost of the anti-collapse regularisers, measured side by side.

For each embedding width D it times, interleaved (round-robin repeats, median):

* ``floor``: the projection ``z @ directions`` and its backward alone, the least any sliced
  regulariser must pay;
* ``draw``: drawing and normalising the K fresh directions of a step (SIGReg pays it too);
* ``sigreg``: ``SIGReg(z, step=...)`` with the fast Epps–Pulley evaluation (draw included);
* ``direct``: the same with the direct formula (``epps_pulley_reference``);
* ``vicreg``: VICReg variance + covariance terms.

Ratios: ``sig/vic`` and ``dir/vic`` compare with VICReg; ``sig/floor`` compares with the bare
projection and ``(sig-draw)/floor`` does the same without the per-step direction draw.

Usage: ``python benchmarks/bench_regularizers.py [--quick] [--device cpu|cuda] [--threads T]``.
Wall times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hjepa.losses.sigreg import SIGReg, epps_pulley_reference, random_directions
from hjepa.losses.vicreg import VICReg


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _cases(z: torch.Tensor, num_slices: int) -> dict[str, Callable[[], None]]:
    sigreg, vicreg = SIGReg(num_slices=num_slices), VICReg()
    dim, step = z.shape[1], iter(range(10**9))
    fixed = random_directions(dim, num_slices, 0, device=z.device)

    def floor() -> None:
        z.grad = None
        projections = z @ fixed
        projections.backward(torch.ones_like(projections))

    def draw() -> None:
        random_directions(dim, num_slices, next(step), device=z.device)

    def fast() -> None:
        z.grad = None
        sigreg(z, step=next(step)).backward()

    def direct() -> None:
        z.grad = None
        directions = random_directions(dim, num_slices, next(step), device=z.device)
        epps_pulley_reference(z @ directions).mean().backward()

    def vic() -> None:
        z.grad = None
        vicreg(z)["total"].backward()

    return {"floor": floor, "draw": draw, "sigreg": fast, "direct": direct, "vicreg": vic}


def measure(
    dim: int, batch: int, num_slices: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per forward + backward for each case at width ``dim``."""
    g = torch.Generator().manual_seed(dim)
    z = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    cases, timer = _cases(z, num_slices), _timer(device)
    for fn in cases.values():  # warm-up: allocator, kernels, lazy initialisation
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two widths, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--slices", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dims = [192, 768] if args.quick else [192, 384, 768, 1024, 2048]
    repeats = 3 if args.quick else 15

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={name} threads={torch.get_num_threads()} N={args.batch} K={args.slices} "
        f"repeats={repeats} (median ms of forward+backward, interleaved)"
    )
    header = (
        f"{'D':>5} {'floor':>8} {'draw':>8} {'vicreg':>8} {'sigreg':>8} {'direct':>9} "
        f"{'sig/vic':>8} {'dir/vic':>8} {'sig/floor':>9} {'(sig-draw)/floor':>16}"
    )
    print(header)
    for dim in dims:
        t = {k: v * 1e3 for k, v in measure(dim, args.batch, args.slices, repeats, device).items()}
        print(
            f"{dim:>5} {t['floor']:>8.3f} {t['draw']:>8.3f} {t['vicreg']:>8.3f} "
            f"{t['sigreg']:>8.3f} {t['direct']:>9.3f} {t['sigreg'] / t['vicreg']:>8.2f} "
            f"{t['direct'] / t['vicreg']:>8.2f} {t['sigreg'] / t['floor']:>9.2f} "
            f"{(t['sigreg'] - t['draw']) / t['floor']:>16.2f}"
        )


if __name__ == "__main__":
    main()
