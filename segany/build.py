"""``build_model``: a ready-to-use model from a registered name and/or a checkpoint file."""

from __future__ import annotations

import logging
import os

import torch

from .checkpoint import (
    CheckpointError,
    config_from_metadata,
    infer_config,
    load_state_dict_strict,
    read_state_dict,
)
from .modeling.config import SamConfig, build_sam
from .modeling.sam import Sam
from .registry import DEFAULT_MODEL, bundled_weights_path, find_variant, get_model_spec

logger = logging.getLogger(__name__)


def build_model(
    name: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> Sam:
    """Builds a model in eval mode and loads its weights strictly.

    - ``checkpoint`` given: an official SAM ``.pth`` or a ``.safetensors`` file. Without
      ``name`` the variant comes from the file's embedded config or from its tensor shapes.
    - only ``name`` given: the variant's bundled weights (official SAM variants have none:
      the error says which file to pass).
    - neither: the bundled default model, segany-lite (shipped inside the package).
    """
    spec = get_model_spec(name) if name is not None else None  # unknown names fail first
    if checkpoint is None:
        spec = spec or get_model_spec(DEFAULT_MODEL)
        bundled = bundled_weights_path(spec.name)
        if bundled is None:
            hint = f" ({spec.checkpoint_file} from {spec.url})" if spec.url else ""
            raise CheckpointError(
                f"model {spec.name!r} has no bundled weights installed; pass "
                f"checkpoint=PATH{hint} (see `segany models`)"
            )
        checkpoint = bundled
    source = str(checkpoint)
    state, metadata = read_state_dict(checkpoint)
    if spec is not None:
        config = spec.config
    else:
        config = config_from_metadata(metadata, source) or infer_config(state, source)
    model = instantiate(config, state, source)
    variant = find_variant(config)
    logger.info("loaded %s (%s) from %s", variant or "custom variant", config, source)
    return model.to(device)


def instantiate(config: SamConfig, state: dict[str, torch.Tensor], source: str) -> Sam:
    """Builds ``config`` without random initialisation and assigns ``state`` strictly."""
    with torch.device("meta"):
        model = build_sam(config)
    try:
        load_state_dict_strict(model, state, source)
    except CheckpointError:
        raise
    except RuntimeError as exc:  # e.g. dtype problems that shapes did not reveal
        raise CheckpointError(f"checkpoint {source} could not be loaded: {exc}") from exc
    # The normalisation buffers are not stored in checkpoints: make them real tensors.
    model.pixel_mean = torch.tensor(config.pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    model.pixel_std = torch.tensor(config.pixel_std, dtype=torch.float32).view(-1, 1, 1)
    return model.eval()
