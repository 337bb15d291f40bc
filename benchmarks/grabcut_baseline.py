"""The classical baseline: GrabCut seeded by the protocol's clicks, on DAVIS-345.

Runs :class:`segany.evaluate.GrabCutPredictor` through :func:`segany.evaluate.evaluate_interactive`
(20 clicks, NoC@85/90, SAM-style first click) and prints NoC, NoF, mIoU after 1/3/5 clicks and
the one-box mIoU. CPU only; about 1 s per prediction at 854 x 480, so the full set (345 x 21
predictions) takes a few hours on one core.

    .venv/bin/python benchmarks/grabcut_baseline.py --limit 40 --out artifacts/grabcut_davis40.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segany.data import DavisDataset
from segany.evaluate import GrabCutPredictor, evaluate_interactive, save_report

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="val/DAVIS folder")
    parser.add_argument("--limit", type=int, default=None, help="first N instances (all: 345)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report to write")
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=5, help="GrabCut iterations")
    parser.add_argument("--seed-radius", type=int, default=5, help="click seed disk radius (px)")
    parser.add_argument(
        "--from-previous",
        action="store_true",
        help="seed each round from GrabCut's previous mask (default: afresh from all clicks)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    dataset = DavisDataset(args.root)
    predictor = GrabCutPredictor(
        iterations=args.iterations,
        seed_radius=args.seed_radius,
        from_previous=args.from_previous,
    )
    report = evaluate_interactive(
        predictor,
        dataset,
        max_clicks=args.max_clicks,
        limit=args.limit,
        progress=not args.no_progress,
    )
    report["settings"]["dataset"] = str(args.root)
    report["settings"]["grabcut"] = {
        "iterations": predictor.iterations,
        "seed_radius": predictor.seed_radius,
        "from_previous": predictor.from_previous,
        "init_radius": "0.1 * min(H, W)"
        if predictor.init_radius is None
        else predictor.init_radius,
    }
    miou = report["miou_at"]
    lines = [
        f"GrabCut on {report['n_instances']} DAVIS instances ({args.max_clicks} clicks)",
        f"  NoC@85 {report['noc']['85']:.2f}   NoC@90 {report['noc']['90']:.2f}",
        f"  NoF@85 {report['nof']['85']}   NoF@90 {report['nof']['90']}",
        "  mIoU@1 {:.4f}   mIoU@3 {:.4f}   mIoU@5 {:.4f}".format(
            *(miou[min(k, len(miou)) - 1] for k in (1, 3, 5))
        ),
        f"  box mIoU {report['box_miou']:.4f}",
        f"  {report['seconds_per_prediction']:.3f} s per prediction",
    ]
    print("\n".join(lines))  # the script's output, not diagnostics
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_report(args.out, report)
        print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
