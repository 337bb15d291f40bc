"""segany vs the reference ``segment_anything`` on the same random ViT-B weights, one process.

Prints medians over ``--repeats`` runs (interleaved: reference, segany, reference, ...) and
the ratio segany/reference, both in wall time and in process CPU time (CPU time is the
steadier measure on a loaded machine). Figures:

* encode: ``set_image`` of a ``--size`` image (fp32 fast paths; fp32 plain; bf16);
* decode 1 click: ``predict`` of one point at the original resolution (masks returned),
  calls alternating with the reference's, then in turns of 5 calls (clicks in a row);
* decode 64: ``predict_torch`` of 64 boxes in one batch;
* everything: ``generate`` of the automatic generator (``--points-per-side``);
* segany-lite (random weights, real size) through PyTorch and ONNX Runtime.

    .venv/bin/python benchmarks/speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import mask_iou, randomize_, synthetic_image

import segany
from segany import AutomaticMaskGenerator, Predictor, build_sam, get_model_spec
from segany.registry import SEGANY_LITE_CONFIG


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, block: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of each function, runs interleaved in turns of ``block``
    consecutive calls (1: every call follows the other side's; more: the steady state of
    calls in a row, as clicks on one image are, each turn's first call included)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(block):
                w, c = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - w, time.process_time() - c))
    return {
        k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
        for k, v in times.items()
    }


def report(title: str, res: dict[str, tuple[float, float]], base: str, unit: float, u: str):
    print(f"\n## {title}")
    bw, bc = res[base]
    for k, (w, c) in res.items():
        print(
            f"  {k:<22} wall {w * unit:9.1f} {u}  cpu {c * unit:9.1f} {u}   "
            f"ratio wall {w / bw:5.2f}  cpu {c / bc:5.2f}"
        )


def random_vit_b() -> torch.nn.Module:
    """segany's ViT-B with the random weights every figure here is measured on."""
    model = randomize_(build_sam(get_model_spec("vit_b").config), 0, 0.02).eval()
    randomize_(model.prompt_encoder, 1, 0.1)
    randomize_(model.mask_decoder, 2, 0.1)
    return model


def random_boxes(h: int, w: int, n: int = 64) -> np.ndarray:
    """``n`` fixed xyxy boxes in an ``h x w`` image (the batch-decoding prompts)."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w / 2, h / 2], (n, 2))
    return np.concatenate([xy, xy + rng.uniform(20, [w / 2, h / 2], (n, 2))], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-repeats", type=int, default=10)
    ap.add_argument("--size", default="480x640", help="image HxW")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--skip", default="", help="comma list: encode,decode,batch,amg,lite,onnx")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    from segany.optimize import set_threads

    print(f"torch {torch.__version__}, threads {set_threads(args.threads)}")
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

    ours = random_vit_b()
    ref = sam_model_registry["vit_b"]().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    plain = build_sam(get_model_spec("vit_b").config).eval()
    plain.load_state_dict(ours.state_dict())
    segany.optimize(plain, fast=False)
    h, w = (int(v) for v in args.size.split("x"))
    image = synthetic_image(h, w, seed=4)
    pr, pa, pp = SamPredictor(ref), Predictor(ours), Predictor(plain)
    torch.set_grad_enabled(False)

    if "encode" not in skip:
        bf16 = build_sam(get_model_spec("vit_b").config).eval()
        bf16.load_state_dict(ours.state_dict())
        segany.optimize(bf16, precision="bf16")
        pbf = Predictor(bf16)
        res = measure(
            {
                "reference": lambda: pr.set_image(image),
                "segany fp32": lambda: pa.set_image(image),
                "segany fp32 plain": lambda: pp.set_image(image),
                "segany bf16": lambda: pbf.set_image(image),
            },
            args.repeats,
        )
        report(f"ViT-B encode {h}x{w} (s)", res, "reference", 1, "s ")
        kw = dict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
        ious = [mask_iou(a, b) for a, b in zip(pa.predict(**kw)[0], pr.predict(**kw)[0])]
        ious16 = [mask_iou(a, b) for a, b in zip(pbf.predict(**kw)[0], pa.predict(**kw)[0])]
        print(
            f"  mask IoU fp32 vs reference: min {min(ious):.5f}; bf16 vs fp32: min {min(ious16):.4f}"
        )
    else:
        pr.set_image(image)
        pa.set_image(image)

    if "decode" not in skip:
        kw = dict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
        pa.predict(**kw)
        pr.predict(**kw)
        one = {"reference": lambda: pr.predict(**kw), "segany": lambda: pa.predict(**kw)}
        res = measure(one, args.decode_repeats)
        report(f"decode one click at {h}x{w} (ms), calls alternating", res, "reference", 1e3, "ms")
        res = measure(one, max(1, args.decode_repeats // 5), block=5)
        report(f"decode one click at {h}x{w} (ms), turns of 5 calls", res, "reference", 1e3, "ms")

    if "batch" not in skip:
        tb = torch.as_tensor(
            pr.transform.apply_boxes(random_boxes(h, w), (h, w)), dtype=torch.float
        )
        res = measure(
            {
                "reference": lambda: pr.predict_torch(None, None, boxes=tb),
                "segany": lambda: pa.predict_torch(None, None, boxes=tb),
            },
            max(3, args.decode_repeats // 3),
        )
        report("decode 64 boxes in one batch (ms)", res, "reference", 1e3, "ms")

    if "amg" not in skip:
        kw2 = dict(points_per_side=args.points_per_side)
        gr = SamAutomaticMaskGenerator(ref, **kw2)
        ga = AutomaticMaskGenerator(ours, **kw2)
        counts = {}
        res = measure(
            {
                "reference": lambda: counts.__setitem__("reference", len(gr.generate(image))),
                "segany": lambda: counts.__setitem__("segany", len(ga.generate(image))),
            },
            args.repeats,
        )
        report(
            f"segment everything, {args.points_per_side}**2 points (s)", res, "reference", 1, "s "
        )
        print(f"  masks: {counts}")

    if "lite" not in skip:
        lite = randomize_(build_sam(SEGANY_LITE_CONFIG), 0, 0.02).eval()
        pl = Predictor(lite)
        fns: dict[str, Callable[[], object]] = {"lite torch": lambda: pl.set_image(image)}
        po = None
        if "onnx" not in skip:
            po = Predictor(lite, backend="onnxruntime")
            fns["lite onnxruntime"] = lambda: po.set_image(image)
        res = measure(fns, max(3, args.repeats))
        report("segany-lite encode (ms)", res, "lite torch", 1e3, "ms")
        kw = dict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
        dfns: dict[str, Callable[[], object]] = {"lite torch": lambda: pl.predict(**kw)}
        if po is not None:
            dfns["lite onnxruntime"] = lambda: po.predict(**kw)
        res = measure(dfns, args.decode_repeats)
        report("segany-lite decode one click (ms)", res, "lite torch", 1e3, "ms")
        if po is not None:
            ious = [mask_iou(a, b) for a, b in zip(po.predict(**kw)[0], pl.predict(**kw)[0])]
            print(f"  mask IoU onnxruntime vs torch: min {min(ious):.4f}")


if __name__ == "__main__":
    main()
