"""The training entry points shared by ``segany train`` and Python code.

::

    from segany.train import TrainConfig, train

    trainer = train("configs/finetune_vit_b_lora.json")  # or train(TrainConfig(...))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .trainer import TrainConfig, TrainerBase, build_training_model

logger = logging.getLogger(__name__)

__all__ = ["ensure_cache", "make_trainer", "train"]


def ensure_cache(config: TrainConfig, progress: bool = True) -> Path:
    """The config's feature cache folder, built (or completed) from its ``data`` if needed."""
    from ..modeling.config import LiteEncoderConfig, SamConfig
    from .cache import build_cache, records_from_datasets

    cache_dir = Path(config.cache_dir)
    done = cache_dir / "done.npy"
    if done.exists() and np.load(done).all():
        return cache_dir
    if not config.data:
        raise ValueError(f"no complete feature cache in {cache_dir} and no 'data' to build it")
    if isinstance(config.model, str):
        from ..registry import get_model_spec

        enc = get_model_spec(config.model).config.image_encoder
    elif config.model:
        enc = SamConfig.from_dict(config.model).image_encoder
    else:
        raise ValueError("mode 'cached' needs a 'model' (SamConfig dict or registered name)")
    if not isinstance(enc, LiteEncoderConfig):
        raise ValueError(
            "mode 'cached' needs a segany-lite (EfficientNet-Lite) encoder; use mode 'images' "
            "for ViT models"
        )
    return build_cache(
        records_from_datasets(config.data),
        cache_dir,
        backbone=enc.backbone,
        img_size=enc.img_size,
        progress=progress,
    )


def make_trainer(config: TrainConfig, progress: bool = True) -> TrainerBase:
    """The trainer of ``config.mode`` with its model (cached mode: the cache built first)."""
    if config.mode == "cached":
        from .cache import FeatureCache
        from .trainer import Trainer

        cache_dir = ensure_cache(config, progress)
        return Trainer(build_training_model(config), config, FeatureCache(cache_dir))
    from .image_trainer import ImageTrainer

    return ImageTrainer(build_training_model(config), config)


def train(
    config: TrainConfig | str | os.PathLike[str],
    *,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainerBase:
    """Trains (resuming from ``out_dir/checkpoint.pt`` if present) and, once ``steps`` are
    done, exports ``out_dir/model.safetensors`` (plus ``lora.safetensors`` with adapters).

    ``stop_at`` ends this call at that step with a checkpoint; calling again resumes.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_json(config)
    trainer = make_trainer(cfg, progress)
    trainer.fit(progress=progress, stop_at=stop_at)
    if trainer.step >= cfg.steps:
        out = trainer.export(Path(cfg.out_dir) / "model.safetensors")
        logger.info("wrote %s (step %d)", out, trainer.step)
    return trainer
