"""segany vs the reference ``segment_anything`` at the real ViT-B size: parity and speed.

Both models hold the same random weights (every parameter filled from seeded generators, std
``--scale`` in the image encoder and ``--decoder-scale`` in the prompt encoder and mask
decoder, as ``tests/test_parity_vit_b.py`` does; no checkpoint file is needed).
The reference is built by the official ``segment_anything.sam_model_registry["vit_b"]``,
segany by its registry's ``vit_b`` config.
On a synthetic ``--height x --width`` image the script prints

* parity: max abs differences of the image embedding, low-res logits and IoU predictions, and
  the IoU of every thresholded mask, for a point, a box and points + box (multimask on/off);
* speed: ``set_image`` (encode) and ``predict`` (decode one point, upsampling and thresholding
  included) of both, the median of ``--repeats`` / ``--decode-repeats`` runs, and the ratio
  segany / reference (below 1: segany is faster). The first encode of each model is the one
  the parity numbers come from and counts as its first timed run; decoding is warmed up once.

    .venv/bin/python benchmarks/parity_vit_b.py
    .venv/bin/python benchmarks/parity_vit_b.py --repeats 1 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from segany import Predictor, build_sam, get_model_spec

PROMPTS: dict[str, dict[str, np.ndarray]] = {
    "one_point": dict(point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1])),
    "box": dict(box=np.array([100.0, 80.0, 420.0, 400.0])),
    "points_and_box": dict(
        point_coords=np.array([[250.0, 200.0], [600.0, 50.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([100.0, 80.0, 420.0, 400.0]),
    ),
}


def randomize_(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), as ``tests/conftest.py`` does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith("weight") and ("norm" in name or p.ndim == 1):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A structured RGB uint8 image (the same as ``tests/conftest.py``'s)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 30)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, first: float | None = None) -> float:
    times = [] if first is None else [first]
    while len(times) < repeats:
        times.append(timed(fn))
    return statistics.median(times)


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    from segment_anything import sam_model_registry

    ours = randomize_(build_sam(get_model_spec("vit_b").config), args.seed, args.scale).eval()
    randomize_(ours.prompt_encoder, args.seed + 1, args.decoder_scale)
    randomize_(ours.mask_decoder, args.seed + 2, args.decoder_scale)
    ref = sam_model_registry["vit_b"]().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(args.device), ref.to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="encode runs (median)")
    parser.add_argument("--decode-repeats", type=int, default=20, help="decode runs (median)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    parser.add_argument("--image-seed", type=int, default=4)
    parser.add_argument(
        "--scale",
        type=float,
        default=0.02,
        help="std of the random image-encoder weights (larger values make float32 rounding "
        "dominate in both implementations; see tests/test_parity_vit_b.py)",
    )
    parser.add_argument(
        "--decoder-scale",
        type=float,
        default=0.1,
        help="std of the random prompt-encoder and mask-decoder weights (0.1: logits ~1..15)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.repeats < 1 or args.decode_repeats < 1:
        parser.error("--repeats and --decode-repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from segment_anything import SamPredictor

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    print(
        f"vit_b, random weights (seed {args.seed}, scale {args.scale}, "
        f"decoder scale {args.decoder_scale}), "
        f"image {args.height}x{args.width}"
    )
    ours, ref = build_models(args)
    image = synthetic_image(args.height, args.width, args.image_seed)
    pa, pb = Predictor(ours), SamPredictor(ref)

    def sync() -> None:
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    def encode(p: Predictor | SamPredictor) -> Callable[[], None]:
        def run() -> None:
            p.set_image(image)  # both run the encoder under torch.no_grad
            sync()

        return run

    first_a = timed(encode(pa))
    first_b = timed(encode(pb))

    print("\n## parity (max abs difference; mask IoU, min over masks)")
    emb_a, emb_b = pa.get_image_embedding(), pb.get_image_embedding()
    emb_diff = (emb_a - emb_b).abs().max().item()
    print(
        f"embedding {tuple(emb_a.shape)}: {emb_diff:.3e} (max |value| "
        f"{emb_b.abs().max().item():.3g})"
    )
    print(
        f"{'prompt':16} {'multimask':>9} {'logits':>10} {'max|logit|':>10} "
        f"{'iou_pred':>10} {'mask IoU':>9}"
    )
    for name, kwargs in PROMPTS.items():
        for multimask in (True, False):
            ma, ia, la = pa.predict(**kwargs, multimask_output=multimask)
            mb, ib, lb = pb.predict(**kwargs, multimask_output=multimask)
            ious = [mask_iou(a, b) for a, b in zip(ma, mb)]
            print(
                f"{name:16} {multimask!s:>9} {np.abs(la - lb).max():10.3e} "
                f"{np.abs(lb).max():10.3g} {np.abs(ia - ib).max():10.3e} {min(ious):9.6f}"
            )

    enc_a = median_seconds(encode(pa), args.repeats, first_a)
    enc_b = median_seconds(encode(pb), args.repeats, first_b)
    kwargs = PROMPTS["one_point"]

    def decode(p: Predictor | SamPredictor) -> Callable[[], None]:
        def run() -> None:
            p.predict(**kwargs, multimask_output=True)
            sync()

        return run

    decode(pa)()
    decode(pb)()
    dec_a = median_seconds(decode(pa), args.decode_repeats)
    dec_b = median_seconds(decode(pb), args.decode_repeats)
    print(f"\n## speed (median; encode of {args.repeats}, decode of {args.decode_repeats})")
    print(f"{'':28} {'segany':>10} {'reference':>10} {'ratio':>7}")
    print(f"{'encode (set_image), s':28} {enc_a:10.3f} {enc_b:10.3f} {enc_a / enc_b:7.3f}")
    print(
        f"{'decode (predict 1 pt), ms':28} {dec_a * 1e3:10.2f} {dec_b * 1e3:10.2f} "
        f"{dec_a / dec_b:7.3f}"
    )


if __name__ == "__main__":
    main()
