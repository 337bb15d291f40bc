"""LoRA adapters: low-rank updates of chosen ``nn.Linear`` layers, base weights frozen.

A wrapped layer computes ``x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A`` (``r x in``,
Kaiming-uniform) and ``B`` (``out x r``, zeros), so a fresh adapter leaves the model's output
unchanged. The wrapper keeps the layer's own parameter names (``...attn.qkv.weight``) and adds
``...attn.qkv.lora_A`` / ``lora_B``; :func:`merge_lora` (or :func:`merged_state_dict`) folds the
update into ``weight`` so exported checkpoints have the official names and load strictly with
:func:`segany.build_model`. :func:`save_lora` / :func:`load_lora` store the adapter weights only.

Targets are ``fnmatch`` patterns over module names; a pattern also matches as a suffix after a
dot, so ``"attn.qkv"`` matches ``image_encoder.blocks.3.attn.qkv`` and ``"q_proj"`` every
decoder query projection.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "load_lora",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "save_lora",
]

#: safetensors metadata key holding the :class:`LoRAConfig` of an adapter file.
LORA_METADATA_KEY = "segany_lora"

#: SAM ViT encoder attention (the usual choice for fine-tuning the official models).
DEFAULT_TARGETS: tuple[str, ...] = (
    "image_encoder.blocks.*.attn.qkv",
    "image_encoder.blocks.*.attn.proj",
)


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how big they are."""

    rank: int = 8  #: rank ``r`` of the update
    alpha: float = 16.0  #: the update is scaled by ``alpha / rank``
    dropout: float = 0.0  #: dropout on the adapter's input (training only)
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)  #: module-name patterns

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty list of patterns: {self.targets!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """From a config dict (``rank``, ``alpha``, ``dropout``, ``targets``); unknown keys raise."""
        known = {"rank", "alpha", "dropout", "targets"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; expected {sorted(known)}")
        data = dict(data)
        if "targets" in data:
            if isinstance(data["targets"], str):
                raise ValueError("LoRA targets must be a list of patterns, not a string")
            data["targets"] = tuple(data["targets"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a low-rank update; shares (does not copy) the base parameters."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # out x in, frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        kw: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))  # r x in
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **kw))  # out x r
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) B A`` (``out x in``)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        w = self.weight
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w + self.delta_weight().to(w.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(w.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, p) or fnmatch(name, "*." + p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapter-wrapped layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wraps every ``nn.Linear`` whose name matches ``config.targets``; returns their names.

    Raises ``ValueError`` when a pattern matches no linear layer (a typo would otherwise train
    nothing) or when the model already has adapters.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    unused = [p for p in config.targets if not any(_matches(n, [p]) for n in linears)]
    if unused:
        raise ValueError(
            f"LoRA targets {unused} match no nn.Linear of the model; linear layers are named "
            f"like {sorted(linears)[:3]}"
        )
    names = [n for n in linears if _matches(n, config.targets)]
    for name in names:
        wrapped = LoRALinear(
            linears[name], rank=config.rank, alpha=config.alpha, dropout=config.dropout
        )
        _set_submodule(model, name, wrapped)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight in place (plain ``nn.Linear`` again); returns
    ``model``, whose state dict then has the official parameter names only."""
    for name, module in lora_modules(model).items():
        _set_submodule(model, name, module.merged())
    return model


def _is_lora_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict :func:`merge_lora` would give, without changing ``model``."""
    state = {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            w = module.weight
            state[f"{name}.weight"] = w.detach() + module.delta_weight().detach().to(w.dtype)
    return state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_A``, ``...lora_B``)."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}


def save_lora(model: nn.Module, path: str | os.PathLike[str], config: LoRAConfig) -> Path:
    """Writes the adapter weights (and ``config``) to a ``.safetensors`` file."""
    from ..checkpoint import save_safetensors

    state = lora_state_dict(model)
    if not state:
        raise ValueError("the model has no LoRA adapters to save")
    out = Path(path)
    save_safetensors(state, out, extra_metadata={LORA_METADATA_KEY: json.dumps(config.to_dict())})
    return out


def load_lora(model: nn.Module, path: str | os.PathLike[str]) -> LoRAConfig:
    """Adds the adapters described in ``path`` (unless the model has them) and loads their
    weights strictly; returns the file's :class:`LoRAConfig`."""
    from ..checkpoint import CheckpointError, read_state_dict

    state, metadata = read_state_dict(path)
    raw = metadata.get(LORA_METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path} is not a LoRA adapter file (no {LORA_METADATA_KEY} metadata)"
        )
    config = LoRAConfig.from_dict(json.loads(raw))
    if not lora_modules(model):
        add_lora(model, config)
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"adapters in {path} do not match the model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, wrong shapes {sorted(wrong)[:4]}"
        )
    model.load_state_dict(state, strict=False)
    return config


def set_trainable(model: nn.Module, groups: str | Sequence[str]) -> list[str]:
    """Makes exactly the parameters of ``groups`` trainable; returns their names.

    Groups: ``all``; ``image_encoder`` (alias ``encoder``); ``backbone`` (the encoder except
    its neck: EfficientNet for segany-lite, patch embedding + blocks for a ViT); ``neck`` (the
    rest of the encoder); ``prompt_encoder``; ``mask_decoder``; ``decoder`` (prompt encoder +
    mask decoder); ``lora`` (adapter weights). Anything else is an ``fnmatch`` pattern over
    parameter names. Several groups may be given as a list or joined with ``+``. The base
    weights of adapter-wrapped layers stay frozen whatever the groups say.
    """
    groups = [
        g for item in ([groups] if isinstance(groups, str) else groups) for g in item.split("+")
    ]
    groups = [g for g in groups if g.strip()]
    names = [n for n, _ in model.named_parameters()]
    enc = model.get_submodule("image_encoder") if hasattr(model, "image_encoder") else None
    neck_prefixes: tuple[str, ...]
    if enc is not None and hasattr(enc, "backbone"):
        neck_prefixes = tuple(
            f"image_encoder.{n}." for n, _ in enc.named_children() if n != "backbone"
        )
    else:
        neck_prefixes = ("image_encoder.neck.",)

    def select(group: str) -> set[str]:
        g = group.strip()
        if g == "all":
            return set(names)
        if g in ("image_encoder", "encoder"):
            return {n for n in names if n.startswith("image_encoder.")}
        if g == "neck":
            return {n for n in names if n.startswith(neck_prefixes)}
        if g == "backbone":
            return {
                n
                for n in names
                if n.startswith("image_encoder.") and not n.startswith(neck_prefixes)
            }
        if g in ("prompt_encoder", "mask_decoder"):
            return {n for n in names if n.startswith(g + ".")}
        if g == "decoder":
            return {n for n in names if n.startswith(("prompt_encoder.", "mask_decoder."))}
        if g == "lora":
            if not lora_modules(model):
                raise ValueError("trainable 'lora' needs LoRA adapters (a 'lora' config section)")
            return {n for n in names if _is_lora_key(n)}
        hits = {n for n in names if fnmatch(n, g)}
        if not hits:
            raise ValueError(
                f"trainable group {g!r} matches no parameter; use all, encoder, backbone, neck, "
                "prompt_encoder, mask_decoder, decoder, lora or a parameter-name pattern"
            )
        return hits

    chosen: set[str] = set()
    for g in groups:
        chosen |= select(g)
    frozen_bases = {
        f"{m}.{p}" for m, mod in lora_modules(model).items() for p in ("weight", "bias")
    }
    chosen -= frozen_bases
    if not chosen:
        raise ValueError(f"trainable {list(groups)} selects no parameter")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]
