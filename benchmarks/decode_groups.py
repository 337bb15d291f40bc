"""How the mask decoder's prompt grouping (``MaskDecoder.group_bytes``) changes batch decoding.

At inference the fast path decodes a batch of prompts in groups whose image-sized activations
(prompts x hw x C floats) stay under ``group_bytes``. This times, interleaved and as medians:

* ``--model lite``: "segment everything" of the bundled segany-lite on a val/DAVIS photo
  resized to 640 px (the default generator: 32 x 32 points, 64 a batch);
* ``--model vit_b``: 64 boxes decoded in one batch on random ViT-B weights (one encoding).

    .venv/bin/python benchmarks/decode_groups.py --model lite --mib 4,8,16 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from lite_targets import DAVIS, _photo
from speed import random_boxes, random_vit_b, synthetic_image  # tests/conftest.py's

from segany import AutomaticMaskGenerator, Predictor, build_model
from segany.optimize import set_threads


def _lite() -> tuple[torch.nn.Module, Callable[[], object]]:
    model = build_model().eval()
    photo = _photo(sorted((DAVIS / "images").iterdir())[0], 640)
    gen = AutomaticMaskGenerator(model)
    return model, lambda: gen.generate(photo)


def _vit_b() -> tuple[torch.nn.Module, Callable[[], object]]:
    model = random_vit_b()
    h, w = 480, 640
    pred = Predictor(model)
    pred.set_image(synthetic_image(h, w, seed=4))
    tb = torch.as_tensor(pred.transform.apply_boxes(random_boxes(h, w), (h, w)), dtype=torch.float)
    return model, lambda: pred.predict_torch(None, None, boxes=tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["lite", "vit_b"], default="lite")
    ap.add_argument("--mib", default="4,8,16", help="comma list of group_bytes in MiB")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {set_threads(None)}")
    torch.set_grad_enabled(False)
    model, run = _lite() if args.model == "lite" else _vit_b()
    decoder = model.mask_decoder
    sizes = [float(v) for v in args.mib.split(",")]
    run()  # warm-up
    times: dict[float, list[float]] = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for s in sizes:
            decoder.group_bytes = int(s * (1 << 20))
            t = time.perf_counter()
            run()
            times[s].append(time.perf_counter() - t)
    base = statistics.median(times[sizes[0]])
    for s, v in times.items():
        med = statistics.median(v)
        runs = " ".join(f"{x:.2f}" for x in v)
        print(f"group_bytes {s:5.1f} MiB  median {med:7.3f} s  ratio {med / base:5.2f}  ({runs})")


if __name__ == "__main__":
    main()
