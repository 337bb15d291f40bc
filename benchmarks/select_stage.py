"""The rule that decides whether a new segany-lite stage replaces the shipped one.

It reads records of ``heldout_interactive.py`` (never DAVIS, which is for reporting only):
``--all`` the runs on the held-out masks of every training set (300 masks, 10 clicks) and
``--whole`` the runs on the whole-object sets alone (``--sets
COCO_MVal,PennFudanPed,WeizmannHorse``). The candidate replaces the incumbent when on ``--all``
it is not worse on mIoU@1, NoC@85, NoC@90 and the box mIoU and better on at least one of them,
beyond a tolerance (``--tol-miou`` 0.005, ``--tol-noc`` 0.05 clicks), and on ``--whole`` not
worse on mIoU@1 and the box. The whole-object guard was added after stage 18, which passed the
first part but lost on boxes on whole objects (held-out -0.012, and DAVIS -0.049 reported
afterwards).

    .venv/bin/python benchmarks/select_stage.py stage18 stage19 \
        --all artifacts/heldout_18.json artifacts/heldout_19.json \
        --whole artifacts/heldout_whole_14_18.json artifacts/heldout_whole_19.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: (label, how to read it from a record, True where higher is better)
FIGURES = {
    "mIoU@1": (lambda r: r["miou_at"][0], True),
    "NoC@85": (lambda r: r["noc85"], False),
    "NoC@90": (lambda r: r["noc90"], False),
    "box": (lambda r: r["box_miou"], True),
}


def load_rows(paths: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for p in paths:
        rows.update(json.loads(Path(p).read_text()))
    return rows


def compare(
    inc: dict[str, Any], cand: dict[str, Any], names: list[str], tol_miou: float, tol_noc: float
) -> tuple[bool, bool, list[str]]:
    """(no figure worse, some figure better, printed lines) beyond the tolerances."""
    worse = better = False
    lines = []
    for name in names:
        read, higher = FIGURES[name]
        a, b = float(read(inc)), float(read(cand))
        tol = tol_miou if name.startswith(("mIoU", "box")) else tol_noc
        gain = (b - a) if higher else (a - b)
        mark = "better" if gain > tol else "WORSE" if gain < -tol else "same"
        worse |= gain < -tol
        better |= gain > tol
        lines.append(f"  {name:7s} {a:7.3f} -> {b:7.3f}  {mark}")
    return not worse, better, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("incumbent", help="row name of the shipped stage, e.g. stage18")
    ap.add_argument("candidate", help="row name of the new stage")
    ap.add_argument("--all", nargs="+", required=True, help="records on every set's masks")
    ap.add_argument("--whole", nargs="+", required=True, help="records on whole-object sets")
    ap.add_argument("--tol-miou", type=float, default=0.005)
    ap.add_argument("--tol-noc", type=float, default=0.05)
    args = ap.parse_args()
    every, whole = load_rows(args.all), load_rows(args.whole)
    for rows, what in ((every, "--all"), (whole, "--whole")):
        missing = [n for n in (args.incumbent, args.candidate) if n not in rows]
        if missing:
            raise SystemExit(f"{what} records have no row {missing} (rows: {sorted(rows)})")
    tol = (args.tol_miou, args.tol_noc)
    ok_all, better, lines = compare(
        every[args.incumbent], every[args.candidate], list(FIGURES), *tol
    )
    print("held-out masks of every set:")
    print("\n".join(lines))
    ok_whole, _, lines = compare(
        whole[args.incumbent], whole[args.candidate], ["mIoU@1", "box"], *tol
    )
    print("whole-object held-out sets:")
    print("\n".join(lines))
    keep = ok_all and better and ok_whole
    why = (
        []
        if keep
        else [
            reason
            for reason, bad in (
                ("worse on every set's masks", not ok_all),
                ("better on none of every set's figures", not better),
                ("worse on the whole-object sets", not ok_whole),
            )
            if bad
        ]
    )
    print(
        f"verdict: {'replace' if keep else 'keep'} {args.incumbent}"
        + (f" ({'; '.join(why)})" if why else f" with {args.candidate}")
    )


if __name__ == "__main__":
    main()
