"""What three choices around the bundled segany-lite cost, timed on val/DAVIS photos.

* ``thresholds``: "segment everything" at 640 px on the first ``--photos`` photos with each
  ``--thresholds`` pair (pred_iou_thresh/stability_score_thresh, offset 1.0): a lower IoU
  threshold sends more candidates on to the full-size stage.
* ``branch``: one click, and one refinement (two clicks and the previous mask), with the
  high-resolution prompt branch and with it switched off (the same weights otherwise), on a
  photo at 640 and at 1024 px and on a random 480 x 640 image.
* ``zoom``: a second zoomed click through the HTTP API (in-process client) with and without
  the previous answer's ``zoom_crop`` (without it the server encodes the crop again).
* ``everything``: "segment everything" at 640 px on the first ``--photos`` photos (the
  model's settings) with the branch's frames made for every prompt of a batch and for the
  prompts whose masks get upscaled only (``Sam.fast_high_res_prompt``); checks the masks match.
* ``refine``: one click (3 candidates) and one refinement with the mask refinement on the
  photo's edges (``segany.refine``) and off, on a photo at 854 (DAVIS's size), 1024 and
  4000 x 2248 px; the first refined click (which makes the guide's terms) apart, and the
  process's peak memory growth on the 4000-px photo.

Prints medians; alternates the compared settings.

    .venv/bin/python benchmarks/lite_costs.py thresholds branch zoom everything refine
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from lite_targets import DAVIS, _photo

from segany import AutomaticMaskGenerator, Predictor, build_model


def _median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def thresholds(model: torch.nn.Module, pairs: list[tuple[float, float]], photos: int, n: int):
    for path in sorted((DAVIS / "images").glob("*.jpg"))[:photos]:
        image = _photo(path, 640)
        for iou, stability in pairs:
            gen = AutomaticMaskGenerator(
                model,
                pred_iou_thresh=iou,
                stability_score_thresh=stability,
                stability_score_offset=1.0,
            )
            kept = len(gen.generate(image))
            ms = _median_ms(functools.partial(gen.generate, image), n)
            print(
                f"{path.name}  iou {iou} / stability {stability}: {ms / 1000:.2f} s, {kept} masks"
            )


def everything(model: torch.nn.Module, photos: int, n: int) -> None:
    gen = AutomaticMaskGenerator(model)
    for path in sorted((DAVIS / "images").glob("*.jpg"))[:photos]:
        image = _photo(path, 640)
        times: dict[bool, list[float]] = {False: [], True: []}
        masks: dict[bool, list[np.ndarray]] = {}
        for _ in range(n):
            for lazy in (False, True):
                model.fast_high_res_prompt = lazy
                t = time.perf_counter()
                masks[lazy] = [r["segmentation"] for r in gen.generate(image)]
                times[lazy].append(time.perf_counter() - t)
        model.fast_high_res_prompt = True
        same = len(masks[False]) == len(masks[True]) and all(
            np.array_equal(a, b) for a, b in zip(masks[False], masks[True])
        )
        print(
            f"{path.name}  everything: branch for every prompt "
            f"{statistics.median(times[False]):.2f} s, for kept masks only "
            f"{statistics.median(times[True]):.2f} s, {len(masks[True])} masks, "
            + ("same masks" if same else "MASKS DIFFER")
        )


def branch(model: torch.nn.Module, n: int) -> None:
    prompt = model.prompt_encoder
    branch_module = prompt.high_res_prompt
    if branch_module is None:
        raise SystemExit("this model has no high-res prompt branch")
    photo = sorted((DAVIS / "images").glob("*.jpg"))[0]
    rng = np.random.default_rng(0)
    images = {
        "photo 640 px": _photo(photo, 640),
        "photo 1024 px": _photo(photo, 1024),
        "random 480 x 640": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8),
    }
    for name, image in images.items():
        _branch_on_image(model, branch_module, name, image, n)


def _branch_on_image(
    model: torch.nn.Module, branch_module: torch.nn.Module, name: str, image: np.ndarray, n: int
) -> None:
    prompt = model.prompt_encoder
    pred = Predictor(model)
    pred.set_image(image)
    h, w = image.shape[:2]
    first = np.array([[w / 2, h / 2]])
    low = pred.predict(first, np.array([1]))[2][:1]
    calls = {
        "click": lambda: pred.predict(first, np.array([1])),
        "refinement": lambda: pred.predict(
            np.array([[w / 2, h / 2], [w / 4, h / 3]]),
            np.array([1, 0]),
            mask_input=low,
            multimask_output=False,
        ),
    }
    res: dict[tuple[str, bool], list[float]] = {}
    try:
        for _ in range(2):  # alternating, twice
            for on in (True, False):
                prompt.high_res_prompt = branch_module if on else None
                for kind, fn in calls.items():
                    res.setdefault((kind, on), []).append(_median_ms(fn, n))
    finally:
        prompt.high_res_prompt = branch_module
    for kind in calls:
        with_b = ", ".join(f"{v:.1f}" for v in res[(kind, True)])
        without = ", ".join(f"{v:.1f}" for v in res[(kind, False)])
        print(f"{name}  {kind}: with the branch {with_b} ms, without {without} ms")


def refine(model: torch.nn.Module, n: int) -> None:
    import resource

    photo = sorted((DAVIS / "images").glob("*.jpg"))[0]
    for longest in (854, 1024, 4000):
        image = _photo(photo, longest)
        h, w = image.shape[:2]
        first, second = np.array([[w / 2, h / 2]]), np.array([[w / 2, h / 2], [w / 4, h / 3]])
        preds = {on: Predictor(model, refine=on) for on in (True, False)}
        for p in preds.values():
            p.set_image(image)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        low = preds[True].predict(first, np.array([1]))[2][:1]
        made = 1000 * (time.perf_counter() - t)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        res: dict[tuple[str, bool], list[float]] = {}
        for _ in range(2):  # alternating, twice
            for on, p in preds.items():
                calls = {
                    "click": functools.partial(p.predict, first, np.array([1])),
                    "refinement": functools.partial(
                        p.predict, second, np.array([1, 0]), None, low, False
                    ),
                }
                for kind, fn in calls.items():
                    res.setdefault((kind, on), []).append(_median_ms(fn, n))
        for kind in ("click", "refinement"):
            on = ", ".join(f"{v:.1f}" for v in res[(kind, True)])
            off = ", ".join(f"{v:.1f}" for v in res[(kind, False)])
            print(f"{w} x {h}  {kind}: refined {on} ms, as decoded {off} ms")
        print(f"{w} x {h}  first refined click {made:.0f} ms, peak memory +{grew:.0f} MiB")


def zoom(model: torch.nn.Module, n: int) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient

    from segany.server import ServerSettings, create_app

    path = sorted((DAVIS / "images").glob("*.jpg"))[1]
    data = path.read_bytes()
    with TestClient(create_app(model, ServerSettings())) as client:
        key = client.post("/v1/images", files={"file": (path.name, data, "image/jpeg")}).json()
        url = f"/v1/images/{key['id']}/predict"
        h, w = key["height"], key["width"]
        x, y = round(w * 0.37), round(h * 0.57)
        first = {"points": [[x, y]], "labels": [1], "zoom_in": True, "return_low_res_logits": True}
        out = client.post(url, json=first).json()
        second = {
            "points": [[x, y], [x + 12, y + 8]],
            "labels": [1, 1],
            "zoom_in": True,
            "mask_input": out["low_res_logits"][out["best"]],
            "multimask_output": False,
        }

        def post(body: dict) -> None:
            r = client.post(url, json=body)
            if r.status_code != 200:
                raise SystemExit(r.text)

        res: dict[bool, list[float]] = {}
        for _ in range(2):
            for hint in (False, True):
                body = dict(second, zoom_crop=out["zoom_crop"]) if hint else second
                res.setdefault(hint, []).append(_median_ms(functools.partial(post, body), n))
    print(
        f"{path.name}: second zoomed click through the API, without zoom_crop "
        + ", ".join(f"{v:.0f}" for v in res[False])
        + " ms, with it "
        + ", ".join(f"{v:.0f}" for v in res[True])
        + f" ms (crop {out['zoom_crop']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "what", nargs="+", choices=["thresholds", "branch", "zoom", "everything", "refine"]
    )
    ap.add_argument("--photos", type=int, default=3, help="thresholds, everything: first N photos")
    ap.add_argument(
        "--thresholds",
        default="0.3/0.7,0.4/0.7,0.5/0.7,0.5/0.6",
        help="comma list of pred_iou_thresh/stability_score_thresh",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="thresholds, everything: runs per setting"
    )
    ap.add_argument(
        "--calls", type=int, default=30, help="branch / zoom / refine: calls per median"
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model().eval()
    if "thresholds" in args.what:
        pairs = [tuple(float(v) for v in p.split("/")) for p in args.thresholds.split(",")]
        thresholds(model, pairs, args.photos, args.repeats)  # type: ignore[arg-type]
    if "branch" in args.what:
        branch(model, args.calls)
    if "refine" in args.what:
        refine(model, args.calls)
    if "zoom" in args.what:
        zoom(model, max(5, args.calls // 3))
    if "everything" in args.what:
        everything(model, args.photos, args.repeats)


if __name__ == "__main__":
    main()
