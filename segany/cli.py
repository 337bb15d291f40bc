"""The ``segany`` command line: segment, auto, models, convert, train, eval, serve, export.

Errors print one line on stderr and exit with status 1 (2 for usage errors); output files
are written atomically, so a failed run leaves no partial file behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("segany")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class CliError(Exception):
    """An error reported as one line, exit status 1."""


# ---------------------------------------------------------------------- argument parsing
def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be comma-separated numbers, got {text!r}"
        ) from None
    if len(values) not in n or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {what.upper()} format")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``X,Y`` or ``X,Y,LABEL`` (LABEL 1 = positive, 0 = negative)."""
    v = _floats(text, (2, 3), "point")
    label = 1 if len(v) == 2 else v[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"point {text!r}: label must be 1 or 0")
    return v[0], v[1], int(label)


def parse_box(text: str) -> list[float]:
    """``X0,Y0,X1,Y1``."""
    return _floats(text, (4,), "box")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="registered model name (see `segany models`)")
    g.add_argument("--checkpoint", help="weights file: official SAM .pth or .safetensors")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse images with more pixels than this (default: segany.images limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany", description="Segment Anything")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "segment",
        help="segment one object (or one per box) from clicks and/or boxes",
        description="Writes the best mask as a 0/255 PNG of the image's size. With several "
        "--box options each box is its own object and OUT is a label map (object k = k).",
    )
    s.add_argument("image")
    s.add_argument(
        "--point",
        action="append",
        type=parse_point,
        default=[],
        metavar="X,Y[,L]",
        help="click in pixels; label 1 positive (default) or 0 negative; repeatable",
    )
    s.add_argument(
        "--box",
        action="append",
        type=parse_box,
        default=[],
        metavar="X0,Y0,X1,Y1",
        help="box in pixels; repeat for several objects",
    )
    s.add_argument("-o", "--output", required=True, help="output mask PNG")
    s.add_argument(
        "--all-masks", action="store_true", help="also write every candidate as OUT_STEM.K.png"
    )
    s.add_argument(
        "--single-mask",
        action="store_true",
        help="ask for one mask instead of 3 candidates (good for unambiguous prompts)",
    )
    s.add_argument("--overlay", help="write an overlay PNG of the mask(s) and prompts")
    s.add_argument("--json", help="write scores, areas and boxes of the candidates as JSON")
    s.add_argument(
        "--zoom-in",
        action="store_true",
        help="decode the clicks a second time on a crop around the best mask, encoded at the "
        "model's input size (sharper boundaries; segany.ZoomInPredictor); one object only",
    )
    _refine_arg(s)
    _model_args(s)

    a = sub.add_parser(
        "auto",
        help="segment everything in an image or a folder of images",
        description="Writes OUT/annotations.json (COCO) and an overlay PNG per image.",
    )
    a.add_argument("input", help="image file or folder")
    a.add_argument("-o", "--output", required=True, help="output folder (created)")
    _generator_args(a)
    a.add_argument(
        "--polygons", action="store_true", help="COCO polygons (holes kept) instead of RLE"
    )
    a.add_argument(
        "--label-map",
        action="store_true",
        help="also write a label-map PNG per image (non-overlapping)",
    )
    a.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")
    _model_args(a)

    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (cached encoder features or raw images)",
        description="Trains with the SAM recipe as the config says: mode 'cached' builds the "
        "feature cache from the config's 'data' if needed and trains after the frozen backbone; "
        "mode 'images' runs the encoder on augmented images (trainable parts, LoRA adapters). "
        "Resumes from OUT_DIR/checkpoint.pt if present; exports OUT_DIR/model.safetensors "
        "(and OUT_DIR/lora.safetensors with LoRA).",
    )
    t.add_argument(
        "config",
        help="training config JSON (see configs/segany_lite.json, configs/finetune_vit_b_lora.json)",
    )
    t.add_argument("--steps", type=int, help="override the number of steps")
    t.add_argument("--out-dir", help="override the run folder")
    t.add_argument(
        "--stop-at",
        type=int,
        help="stop this session at that step with a checkpoint (rerun the command to resume)",
    )
    t.add_argument("--cache-dir", help="override the feature cache folder (mode 'cached')")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser(
        "eval",
        help="evaluation: interactive clicks (NoC, mIoU), segment-everything or box-prompted AP",
        description="--task interactive (default): clicks at the innermost point of the larger "
        "error region (the standard protocol), previous logits fed back, up to --max-clicks; "
        "writes a JSON report and a plot of mIoU against clicks. --task everything: mask AP/AR "
        "(COCO, class-agnostic, pycocotools) of the automatic generator's masks against every "
        "ground-truth mask of each image. --task box: mask AP/AR and mIoU with each "
        "ground-truth box as the prompt. Crowd masks (iscrowd) are regions to ignore.",
    )
    e.add_argument(
        "data",
        help="dataset: a manifest folder (manifest.jsonl), a DAVIS-style folder (images/, "
        "masks/) or a COCO instances JSON (with --image-dir)",
    )
    e.add_argument("-o", "--output", required=True, help="report JSON")
    e.add_argument(
        "--task",
        choices=["interactive", "everything", "box"],
        default="interactive",
        help="what to evaluate (default: interactive)",
    )
    e.add_argument("--image-dir", help="images of a COCO JSON (default: the JSON's folder)")
    e.add_argument("--limit", type=int, help="evaluate the first N instances (images for AP)")
    e.add_argument("--baseline", choices=["grabcut"], help="evaluate a classical baseline")
    g = e.add_argument_group("interactive")
    g.add_argument("--plot", help="PNG plot of mIoU against clicks")
    g.add_argument("--max-clicks", type=int, default=20)
    g.add_argument(
        "--zoom-in",
        action="store_true",
        help="predict each click after the first on a crop around the object, encoded at the "
        "model's input size (RITM's zoom-in; segany.zoom.ZoomInPredictor), and decode the "
        "first click a second time on a crop around its mask",
    )
    g.add_argument(
        "--flip",
        action="store_true",
        help="average every prediction with that of the mirrored image (test-time flip)",
    )
    _refine_arg(g)
    g = e.add_argument_group("everything and box")
    g.add_argument("--overlays", help="folder for ground truth | prediction PNGs of a few images")
    g.add_argument("--n-overlays", type=int, default=8, help="images with an overlay (default 8)")
    g.add_argument(
        "--multimask",
        action="store_true",
        help="box: keep the best of 3 candidate masks instead of asking for one",
    )
    g.add_argument(
        "--score",
        choices=["predicted_iou", "stability_score", "product"],
        default="predicted_iou",
        help="everything: how masks are ranked for AP (default: predicted_iou)",
    )
    _generator_args(g)
    _model_args(e)

    v = sub.add_parser(
        "serve",
        help="HTTP API and browser annotation page (needs the 'server' extra)",
        description="Serves the JSON API under /v1 (OpenAPI schema at /openapi.json) and the "
        "annotation page at /. Binds to 127.0.0.1 unless --host says otherwise. Without "
        "--model/--checkpoint it runs the bundled segany-lite model.",
    )
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    v.add_argument(
        "--api-key",
        default=None,
        help="require this key in the X-API-Key header (default: $SEGANY_API_KEY, else none)",
    )
    v.add_argument("--cache-dir", help="on-disk embedding cache, kept across restarts")
    v.add_argument(
        "--cache-mb", type=int, default=1024, help="memory bound of the embedding cache (MiB)"
    )
    v.add_argument("--max-upload-mb", type=int, default=32, help="largest request body (MiB)")
    v.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow cross-origin requests from ORIGIN (repeatable; default: CORS off)",
    )
    v.add_argument("--workers", type=int, default=1, help="model worker threads")
    v.add_argument("--queue", type=int, default=64, help="requests allowed to wait (then 503)")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait (503)")
    _model_args(v)

    sub.add_parser("models", help="list the registered model variants")

    c = sub.add_parser("convert", help="convert a checkpoint to .safetensors (strictly checked)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--model", help="variant name (default: inferred from the file)")

    x = sub.add_parser(
        "export",
        help="export the model to ONNX for ONNX Runtime (encoder + prompt decoder)",
        description="Writes OUT/encoder.onnx, OUT/decoder.onnx (dynamic numbers of objects and "
        "points) and OUT/segany_onnx.json. Needs the onnx extra: pip install 'segany[onnx]'.",
    )
    x.add_argument("output", help="output folder (created)")
    x.add_argument("--quantize", action="store_true", help="int8 weights (smaller, approximate)")
    x.add_argument("--model", help="registered model name (see `segany models`)")
    x.add_argument("--checkpoint", help="weights file: official SAM .pth or .safetensors")
    x.set_defaults(device="cpu")
    return parser


# ---------------------------------------------------------------------- commands
#: AutomaticMaskGenerator settings shared by `auto` and `eval --task everything`:
#: (option, type, default), the reference's defaults; None: the model's own (SAM's 0.88 /
#: 0.95 / 1.0 for official checkpoints, calibrated values for segany-lite).
_GENERATOR_OPTIONS: tuple[tuple[str, type, Any], ...] = (
    ("points_per_side", int, 32),
    ("points_per_batch", int, 64),
    ("pred_iou_thresh", float, None),
    ("stability_score_thresh", float, None),
    ("stability_score_offset", float, None),
    ("box_nms_thresh", float, 0.7),
    ("crop_n_layers", int, 0),
    ("crop_n_points_downscale_factor", int, 1),
    ("min_mask_region_area", int, 0),
)


def _generator_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    for name, kind, default in _GENERATOR_OPTIONS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            help="default: the model's own (segany models list it)"
            if default is None
            else f"default: {default}",
        )


def _generator_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name, _, _ in _GENERATOR_OPTIONS}


def _load_model(args: argparse.Namespace) -> Any:
    from .build import build_model

    return build_model(args.model, args.checkpoint, device=args.device)


def _load_image(path: str, args: argparse.Namespace) -> np.ndarray:
    from .images import DEFAULT_MAX_PIXELS, load_image

    limit = args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS
    return load_image(path, max_pixels=limit)


def _check_output_dir(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise CliError(f"output folder does not exist: {parent}")


def cmd_segment(args: argparse.Namespace) -> int:
    from . import masks as M
    from .predictor import Predictor
    from .refine import REFINE_CHOICES

    if not args.point and not args.box:
        raise CliError("give at least one --point or --box")
    if args.point and len(args.box) > 1:
        raise CliError("--point cannot be combined with several --box (one object per box)")
    for out in (args.output, args.overlay, args.json):
        if out:
            _check_output_dir(out)
    if args.zoom_in and len(args.box) > 1:
        raise CliError("--zoom-in refines one object: give points and/or one --box")
    image = _load_image(args.image, args)
    predictor: Any = Predictor(_load_model(args), refine=REFINE_CHOICES[args.refine])
    if args.zoom_in:
        from .zoom import ZoomInPredictor

        predictor = ZoomInPredictor(predictor)
    predictor.set_image(image)
    coords = np.array([p[:2] for p in args.point], dtype=np.float64) if args.point else None
    labels = np.array([p[2] for p in args.point], dtype=np.int64) if args.point else None
    multimask = not args.single_mask
    if len(args.box) > 1:
        masks, scores, _ = predictor.predict_batch(
            boxes=np.array(args.box), multimask_output=multimask
        )
        best = scores.argmax(axis=1)
        chosen = [masks[i, best[i]] for i in range(len(masks))]
        candidates = [list(zip(masks[i], scores[i])) for i in range(len(masks))]
        primary = M.label_map(chosen)
        writer = lambda: M.save_label_map_png(args.output, primary)  # noqa: E731
    else:
        box = np.array(args.box[0]) if args.box else None
        m, s, _ = predictor.predict(coords, labels, box, multimask_output=multimask)
        best = np.array([int(np.argmax(s))])
        chosen = [m[best[0]]]
        candidates = [list(zip(m, s))]
        writer = lambda: M.save_mask_png(args.output, chosen[0])  # noqa: E731
    writer()
    stem = Path(args.output)
    report: dict[str, Any] = {
        "image": str(args.image),
        "size": list(image.shape[:2]),
        "objects": [],
    }
    for obj, cands in enumerate(candidates):
        entries = []
        for k, (mask, score) in enumerate(cands):
            entry: dict[str, Any] = {
                "index": k,
                "score": float(score),
                "area": int(mask.sum()),
                "bbox": _bbox(mask),
            }
            if args.all_masks:
                suffix = f".{k}" if len(candidates) == 1 else f".obj{obj + 1}.{k}"
                path = stem.with_name(stem.stem + suffix + ".png")
                M.save_mask_png(path, mask)
                entry["file"] = str(path)
            entries.append(entry)
        report["objects"].append({"best": int(best[obj]), "candidates": entries})
    if args.overlay:
        M.save_overlay_png(
            args.overlay,
            image,
            chosen,
            points=coords,
            point_labels=labels,
            boxes=np.array(args.box) if args.box else None,
        )
    if args.json:
        with M.atomic_write(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    best_scores = ", ".join(f"{c[b][1]:.3f}" for c, b in zip(candidates, best))
    print(f"wrote {args.output} (predicted IoU {best_scores})")
    return 0


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


def _list_images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CliError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {path}")
        return files
    if not path.exists():
        raise CliError(f"input not found: {path}")
    return [path]


def cmd_auto(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import masks as M
    from .automatic import AutomaticMaskGenerator
    from .images import ImageLoadError

    files = _list_images(Path(args.input))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = AutomaticMaskGenerator(
        _load_model(args),
        output_mode="coco_rle",
        **_generator_settings(args),
    )
    images, annotations, failed = [], [], []
    bar = tqdm(files, desc="segment everything", unit="img", disable=len(files) == 1)
    for idx, path in enumerate(bar):
        try:
            image = _load_image(str(path), args)
        except ImageLoadError as exc:
            failed.append(str(exc))
            tqdm.write(f"segany: skipped: {exc}", file=sys.stderr)
            continue
        records = generator.generate(image)
        h, w = image.shape[:2]
        images.append({"id": idx + 1, "file_name": path.name, "height": h, "width": w})
        annotations.append(records)
        decoded = [M.decode_rle(r["segmentation"]) for r in records]
        if not args.no_overlay:
            M.save_overlay_png(out_dir / f"{path.stem}_overlay.png", image, decoded)
        if args.label_map:
            scores = [r["predicted_iou"] for r in records]
            M.save_label_map_png(
                out_dir / f"{path.stem}_labels.png", M.label_map(decoded, scores=scores)
            )
        bar.set_postfix(masks=len(records))
    data = M.coco_json(images, annotations, mode="polygon" if args.polygons else "rle")
    M.save_coco_json(out_dir / "annotations.json", data)
    n = sum(len(a) for a in annotations)
    print(f"wrote {out_dir / 'annotations.json'}: {n} masks in {len(images)} image(s)")
    if failed:
        raise CliError(f"{len(failed)} of {len(files)} images could not be read (see above)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from .server import ServerSettings, create_app
    except ModuleNotFoundError as exc:
        raise CliError(f"segany serve needs {exc.name}: pip install 'segany[server]'") from exc
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be within 1..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SEGANY_API_KEY")
    settings = ServerSettings(
        max_upload_bytes=args.max_upload_mb * 2**20,
        cache_bytes=args.cache_mb * 2**20,
        cache_dir=args.cache_dir,
        api_key=api_key or None,
        cors_origins=tuple(args.cors_origin),
        workers=args.workers,
        max_queue=args.queue,
        timeout_s=args.timeout,
        **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}),
    )
    model = _load_model(args)
    app = create_app(model, settings, model_name=args.model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning("serving on %s without an API key (--api-key)", args.host)
    print(f"segany: serving on http://{args.host}:{args.port}/ (Ctrl+C to stop)", file=sys.stderr)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import DEFAULT_MODEL, bundled_weights_path, list_models

    for spec in list_models():
        if spec.bundled is not None:
            where = "bundled" if bundled_weights_path(spec.name) else "bundled (not installed)"
        else:
            where = f"--checkpoint {spec.checkpoint_file}"
        mark = "*" if spec.name == DEFAULT_MODEL else " "
        print(f"{mark} {spec.name:<12} {spec.description:<62} {where}")
        if spec.generator_defaults:
            own = ", ".join(f"{k} {v:g}" for k, v in spec.generator_defaults.items())
            print(f"  {'':<12} segment everything defaults: {own}")
    print("* the default (used when neither --model nor --checkpoint is given)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .build import build_model
    from .checkpoint import save_safetensors

    _check_output_dir(args.output)
    if Path(args.output).suffix != ".safetensors":
        raise CliError(f"output must end in .safetensors: {args.output}")
    model = build_model(args.model, args.input)
    save_safetensors(model, args.output, config=model.config)
    print(f"wrote {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from .export import export_onnx

        model = _load_model(args)
        out = export_onnx(model, args.output, quantize=args.quantize)
    except ImportError as exc:
        raise CliError(str(exc)) from exc
    print(f"wrote {out}/encoder.onnx, {out}/decoder.onnx")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, make_trainer

    cfg = TrainConfig.from_json(args.config)
    for key in ("steps", "out_dir", "cache_dir"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    trainer = make_trainer(cfg, progress=not args.no_progress)
    trainer.fit(progress=not args.no_progress, stop_at=args.stop_at)
    if trainer.step < cfg.steps:
        print(f"stopped at step {trainer.step} of {cfg.steps}; run again to resume")
        return 0
    out = trainer.export(Path(cfg.out_dir) / "model.safetensors")
    lora = out.with_name("lora.safetensors")
    extra = f" and {lora}" if cfg.lora is not None else ""
    print(f"wrote {out}{extra} (step {trainer.step})")
    return 0


def _eval_dataset(args: argparse.Namespace) -> Any:
    from .data import CocoDataset, DavisDataset, ManifestDataset

    root = Path(args.data)
    if root.is_file() and root.suffix.lower() == ".json":
        image_dir = Path(args.image_dir) if args.image_dir else root.parent
        # Crowd regions are kept for AP (they are ignore regions there), never clicked on.
        return CocoDataset(root, image_dir, include_crowd=args.task != "interactive")
    if args.image_dir:
        raise CliError("--image-dir is only for a COCO JSON dataset")
    if (root / "manifest.jsonl").exists():
        return ManifestDataset(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return DavisDataset(root)
    raise CliError(
        f"{root} is neither a manifest folder, a DAVIS-style folder nor a COCO JSON file"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import GrabCutPredictor, evaluate_interactive, plot_miou_curve, save_report
    from .predictor import Predictor
    from .refine import REFINE_CHOICES

    if args.task != "interactive" and args.plot:
        raise CliError("--plot is for --task interactive; use --overlays for pictures")
    if args.task == "everything" and args.baseline:
        raise CliError("--baseline grabcut has no 'segment everything' mode")
    for out in (args.output, args.plot):
        if out:
            _check_output_dir(out)
    if (args.zoom_in or args.flip) and (args.baseline or args.task != "interactive"):
        raise CliError("--zoom-in and --flip are for a model's --task interactive")
    dataset = _eval_dataset(args)
    model: Any = None
    if args.baseline == "grabcut":
        predictor: Any = GrabCutPredictor()
        name = "GrabCut"
    else:
        model = _load_model(args)
        predictor = Predictor(model, refine=REFINE_CHOICES[args.refine])
        name = args.model or (Path(args.checkpoint).stem if args.checkpoint else "segany-lite")
        if args.zoom_in or args.flip:
            from .zoom import ZoomInPredictor

            predictor = ZoomInPredictor(
                predictor,
                skip_clicks=1 if args.zoom_in else 10**9,
                first_click_refine=args.zoom_in,
                flip=args.flip,
            )
            name += "".join(f" +{k}" for k in ("zoom_in", "flip") if getattr(args, k))
    if args.task != "interactive":
        return _eval_ap(args, dataset, model, predictor, name)
    report = evaluate_interactive(predictor, dataset, max_clicks=args.max_clicks, limit=args.limit)
    report["name"] = name
    report["data"] = str(args.data)
    save_report(args.output, report)
    if args.plot:
        plot_miou_curve({name: report}, args.plot)
    noc = report["noc"]
    print(
        f"{name}: NoC@85 {noc['85']:.2f}  NoC@90 {noc['90']:.2f}  "
        f"mIoU@1 {report['miou_at'][0]:.3f}  box mIoU {report['box_miou']:.3f}  "
        f"({report['n_instances']} instances) -> {args.output}"
    )
    return 0


def _refine_arg(parser: Any) -> None:
    from .refine import REFINE_CHOICES

    parser.add_argument(
        "--refine",
        choices=list(REFINE_CHOICES),
        default="auto",
        help="snap mask boundaries onto the photo's edges (guided filter, segany.refine); "
        "auto (default): for segany-lite models, not for official SAM checkpoints",
    )


def _eval_ap(args: argparse.Namespace, dataset: Any, model: Any, predictor: Any, name: str) -> int:
    from .evaluate import save_report
    from .evaluate_coco import evaluate_box_prompted, evaluate_everything, summary_line

    common: dict[str, Any] = {
        "limit": args.limit,
        "overlays": args.overlays,
        "n_overlays": args.n_overlays,
    }
    if args.task == "everything":
        from .automatic import AutomaticMaskGenerator

        generator = AutomaticMaskGenerator(
            model,
            output_mode="coco_rle",
            **_generator_settings(args),
        )
        report = evaluate_everything(generator, dataset, score=args.score, **common)
    else:
        report = evaluate_box_prompted(predictor, dataset, multimask=args.multimask, **common)
    report["name"] = name
    report["data"] = str(args.data)
    save_report(args.output, report)
    print(f"{name} ({args.task}): {summary_line(report)} -> {args.output}")
    return 0


COMMANDS = {
    "segment": cmd_segment,
    "auto": cmd_auto,
    "models": cmd_models,
    "convert": cmd_convert,
    "train": cmd_train,
    "eval": cmd_eval,
    "serve": cmd_serve,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("segany: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"segany: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
