"""Training and fine-tuning: datasets, augmentation, feature caches, prompt simulation,
losses, LoRA adapters and the two trainers (cached features, raw images).

Entry points: :func:`train` (what ``segany train CONFIG`` runs), :func:`make_trainer`,
:class:`TrainConfig`.
"""

from .api import ensure_cache, make_trainer, train
from .trainer import TrainConfig, Trainer, TrainerBase, build_training_model

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainerBase",
    "build_training_model",
    "ensure_cache",
    "make_trainer",
    "train",
]
