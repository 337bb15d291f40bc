"""Loading and saving weights: official ``.pth`` files and ``.safetensors``, strictly.

Every failure raises :class:`CheckpointError` naming the file and saying what is wrong
(missing, truncated, not a checkpoint, missing/unexpected keys, wrong shapes).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modeling.config import (
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    ViTEncoderConfig,
)

logger = logging.getLogger(__name__)

#: safetensors metadata key holding the model config as JSON.
CONFIG_METADATA_KEY = "segany_config"


class CheckpointError(ValueError):
    """A checkpoint file could not be used; the message names the file."""


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _file_kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header. Checked first:
    # the length itself may start with b"\x80" or b"PK" (a 0x5680- or 0x14B50-byte header).
    # Torch files never have "{" there (zip: compression method; legacy: the magic number).
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads tensors (on CPU) and metadata from ``.pth``/``.pt`` or ``.safetensors``.

    Official ``.pth`` files are read with ``weights_only=True``; training checkpoints that wrap
    the weights in ``{"model": ...}`` or ``{"state_dict": ...}`` are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes)")
    kind = _file_kind(p)
    metadata: dict[str, str] = {}
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as fh:
                metadata = dict(fh.metadata() or {})
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {p} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
    elif kind in ("torch-zip", "torch-legacy"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"checkpoint {p} could not be read (truncated, corrupt or not a weights file): "
                f"{msg}"
            ) from exc
        state = _unwrap(obj, p)
    else:
        raise CheckpointError(
            f"{p} is not a PyTorch (.pth) or safetensors checkpoint (unrecognised file header)"
        )
    return state, metadata


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} does not contain a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-tensor entries: {_list(bad)}")
    state = dict(obj)
    return remap_keys(state)


def remap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one place where foreign key names are mapped to ours (DDP ``module.`` prefix)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _count_indexed(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> SamConfig:
    """Derives a :class:`SamConfig` from the tensor shapes of a SAM (ViT) state dict.

    The decoder's number of attention heads is not visible in shapes; the official 8 is used.
    """
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]  # C x 3 x p x p
        pos = state["image_encoder.pos_embed"]  # 1 x g x g x C
        embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        grid = int(pos.shape[1])
        depth = _count_indexed(state, "image_encoder.blocks.")
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        glob, window = [], 0
        for i in range(depth):
            n = int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0])
            if n == 2 * grid - 1:
                glob.append(i)
            else:
                window = (n + 1) // 2
        mlp_hidden = int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0])
        out_chans = int(state["image_encoder.neck.0.weight"].shape[0])
        enc = ViTEncoderConfig(
            img_size=grid * patch_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // head_dim,
            mlp_ratio=mlp_hidden / embed_dim,
            out_chans=out_chans,
            window_size=window or 14,
            global_attn_indexes=tuple(glob),
        )
        prompt = PromptEncoderConfig(
            mask_in_chans=int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0])
        )
        q_dim = int(
            state[
                "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"
            ].shape[0]
        )
        dec = MaskDecoderConfig(
            num_multimask_outputs=int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
            transformer_depth=_count_indexed(state, "mask_decoder.transformer.layers."),
            transformer_mlp_dim=int(
                state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
            ),
            attention_downsample_rate=out_chans // q_dim,
            iou_head_depth=_count_indexed(state, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=int(
                state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
            ),
        )
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"{source} does not look like a SAM checkpoint (cannot infer the variant: "
            f"missing or odd tensor {exc}); pass the model name explicitly"
        ) from exc
    return SamConfig(image_encoder=enc, prompt_encoder=prompt, mask_decoder=dec)


def config_from_metadata(metadata: Mapping[str, str], source: str) -> SamConfig | None:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        return SamConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {source} has an invalid embedded config: {exc}") from exc


def load_state_dict_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Sequence[str] = (),
) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, keys and shapes.

    ``allow_missing``: key prefixes the file may lack (modules a training config adds to
    weights made without them); those keep the model's values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    kept = [k for k in missing if k.startswith(tuple(allow_missing))]
    if allow_missing and not kept:
        raise CheckpointError(
            f"checkpoint {source}: no key of the model starting with {list(allow_missing)} is "
            "missing from it (nothing to keep; check the prefixes)"
        )
    missing = [k for k in missing if k not in kept]
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_list(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape: {_list(wrong, 4)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match the model: " + "; ".join(problems)
        )
    # Assign (works for models built on the meta device), in the model's own dtypes, in
    # 64-byte aligned memory: tensors of a .safetensors file sit at 8-byte offsets of it, and
    # some CPU kernels round differently on such memory (the same weights would not give
    # bitwise the same outputs as the model they were saved from).
    cast = {k: _aligned(v.to(expected[k].dtype)) for k, v in state.items()}
    cast.update({k: expected[k] for k in kept})
    model.load_state_dict(cast, strict=True, assign=True)


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t``, or a copy of it in fresh (aligned) memory where its data is not aligned."""
    if t.device.type != "cpu" or t.data_ptr() % alignment == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_safetensors(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    config: SamConfig | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes weights (and the config as metadata) atomically to ``path``."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"cannot save {path}: non-tensor values for keys {_list(bad)}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = config.to_json()
    metadata.update(extra_metadata or {})
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
