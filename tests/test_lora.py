"""LoRA adapters: exact no-op at init, merge = unmerged forward, gradients, strict export."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, randomize_

from segany import build_model, build_sam, save_safetensors
from segany.checkpoint import CheckpointError
from segany.modeling.image_encoder import Attention as VitAttention
from segany.optimize import set_fast_paths
from segany.train.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_lora,
    set_trainable,
)

#: Encoder attention (windowed and global blocks) and every decoder attention projection.
TARGETS = ("attn.qkv", "attn.proj", "q_proj", "k_proj", "v_proj", "out_proj")


def _base() -> torch.nn.Module:
    torch.manual_seed(0)  # the prompt encoder's random Fourier features are a buffer
    return randomize_(build_sam(TINY), seed=3, scale=0.1).eval()


def _forward(model, x, points):
    """Image -> (low-res logits, IoU) for a batch of 2-point prompts; grads allowed."""
    emb, hr = model.encode_image(x)
    sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
    return model.mask_decoder(
        image_embeddings=emb,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        high_res_features=hr,
    )


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 160, 160, generator=g)
    coords = torch.rand(3, 2, 2, generator=g) * 160
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]], dtype=torch.int)
    return x, (coords, labels)


def _perturb_adapters(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def test_zero_init_adapter_is_the_base_model_exactly(inputs):
    base = _base()
    model = copy.deepcopy(base)
    names = add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS))
    enc_names = [n for n in names if n.startswith("image_encoder.")]
    assert len(enc_names) == 2 * TINY.image_encoder.depth
    assert any(n.startswith("mask_decoder.") for n in names)
    # Official parameter names are kept; adapters only add lora_A / lora_B.
    extra = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict())
    assert extra and all(k.endswith((".lora_A", ".lora_B")) for k in extra)
    model.eval()
    # Bit for bit only on the same computation: adapter-wrapped projections take the plain
    # attention, the bare model its fast paths (equal within float rounding, test_fast_paths).
    set_fast_paths(base, False)
    set_fast_paths(model, False)
    with torch.no_grad():
        ref = _forward(base, *inputs)
        out = _forward(model, *inputs)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_merge_equals_unmerged_forward_and_export_loads_strictly(inputs, tmp_path):
    base = _base()
    model = copy.deepcopy(base)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS))
    _perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        unmerged = _forward(model, *inputs)
        ref = _forward(base, *inputs)
    assert (unmerged[0] - ref[0]).abs().max() > 1e-3  # the adapters do something

    state = merged_state_dict(model)
    assert set(state) == set(base.state_dict())  # official names only
    merged = merge_lora(copy.deepcopy(model))
    assert not lora_modules(merged)
    assert set(merged.state_dict()) == set(base.state_dict())
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        out = _forward(merged, *inputs)
    for a, b in zip(out, unmerged):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    path = tmp_path / "merged.safetensors"
    save_safetensors(state, path, config=TINY)
    loaded = build_model(checkpoint=path)  # strict
    with torch.no_grad():
        out2 = _forward(loaded, *inputs)
    for a, b in zip(out2, unmerged):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_only_adapters_get_gradients(inputs):
    model = _base()
    add_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.2, targets=TARGETS))
    _perturb_adapters(model)  # so lora_A gets a gradient too
    names = set_trainable(model, "lora")
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    model.train()
    for m in model.image_encoder.modules():  # training takes the reference attention path
        if isinstance(m, VitAttention):
            m.fused = False
    low, iou = _forward(model, *inputs)
    (low.square().mean() + iou.sum()).backward()
    for n, p in model.named_parameters():
        if n.endswith((".lora_A", ".lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_trainable_groups_keep_wrapped_bases_frozen():
    model = _base()
    add_lora(model, LoRAConfig(targets=("attn.qkv",)))
    names = set_trainable(model, ["decoder+lora"])
    assert all(n.startswith(("prompt_encoder.", "mask_decoder.")) or "lora_" in n for n in names)
    names = set_trainable(model, "all")
    assert "image_encoder.blocks.0.attn.qkv.weight" not in names  # adapter base stays frozen
    assert "image_encoder.blocks.0.attn.proj.weight" in names
    neck = set_trainable(model, "neck+mask_decoder")
    assert any(n.startswith("image_encoder.neck.") for n in neck)
    assert not any(n.startswith(("image_encoder.blocks", "prompt_encoder.")) for n in neck)
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(model, "nothing.like.this")


def test_targets_must_match_and_adapters_round_trip(inputs, tmp_path):
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(_base(), LoRAConfig(targets=("attn.qkv", "no_such_layer")))
    model = _base()
    cfg = LoRAConfig(rank=3, alpha=3, targets=("attn.qkv", "q_proj"))
    add_lora(model, cfg)
    with pytest.raises(ValueError, match="already has"):
        add_lora(model, cfg)
    _perturb_adapters(model, seed=5)
    path = save_lora(model, tmp_path / "lora.safetensors", cfg)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == set(lora_state_dict(model))  # adapter weights only

    fresh = _base()
    assert load_lora(fresh, path) == cfg
    assert all(isinstance(m, LoRALinear) for m in lora_modules(fresh).values())
    model.eval()
    fresh.eval()
    with torch.no_grad():
        for a, b in zip(_forward(fresh, *inputs), _forward(model, *inputs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _base()
    add_lora(other, LoRAConfig(rank=2, targets=("attn.qkv",)))
    with pytest.raises(CheckpointError, match="do not match"):
        load_lora(other, path)
