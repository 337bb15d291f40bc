"""Every fast path equals the plain (reference) path on tiny random configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY, make_pair, mask_iou, randomize_, synthetic_image

import segany
from segany import Predictor
from segany.modeling import MaskDecoderConfig, build_sam, common
from segany.modeling import image_encoder as vit
from segany.optimize import set_fast_paths

# A decoder wide enough for the factored few-token attention (heads*tokens < internal dim).
WIDE = dataclasses.replace(
    TINY,
    image_encoder=dataclasses.replace(TINY.image_encoder, out_chans=64),
    mask_decoder=MaskDecoderConfig(
        transformer_mlp_dim=64, transformer_num_heads=2, iou_head_hidden_dim=32
    ),
)


def _model(config=TINY, seed=0):
    return randomize_(build_sam(config), seed).eval()


def _both(model, fn):
    set_fast_paths(model, False)
    with torch.no_grad():
        plain = fn()
    set_fast_paths(model, True)
    with torch.no_grad():
        fast = fn()
    return fast, plain


@pytest.mark.parametrize("budget", [1 << 24, 300, 5000])
@pytest.mark.parametrize("onednn", [True, False])
def test_encoder_fast_equals_plain(monkeypatch, budget, onednn):
    """Banded relative-position attention (bands of windows, heads and query rows)."""
    monkeypatch.setattr(vit, "REL_POS_BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(common, "ONEDNN_LINEAR", onednn)
    monkeypatch.setattr(vit, "MLP_CHUNK_TOKENS", 7)
    model = _model()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    fast, plain = _both(model, lambda: model.image_encoder(x))
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_points", [1, 3, 9])
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_fast_equals_plain(n_points, multimask):
    model = _model(WIDE)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 64, 10, 10, generator=g)
    sparse = torch.randn(4, n_points, 64, generator=g)
    dense = torch.randn(4, 64, 10, 10, generator=g)
    pe = model.prompt_encoder.get_dense_pe()
    (ma, ia), (mb, ib) = _both(model, lambda: model.mask_decoder(emb, pe, sparse, dense, multimask))
    assert ma.shape == mb.shape == (4, 3 if multimask else 1, 40, 40)
    torch.testing.assert_close(ma, mb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ia, ib, atol=1e-4, rtol=1e-4)


def test_decoder_fast_equals_plain_with_high_res_features():
    cfg = dataclasses.replace(
        WIDE, mask_decoder=dataclasses.replace(WIDE.mask_decoder, use_high_res_features=True)
    )
    model = _model(cfg)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(1, 64, 10, 10, generator=g)
    high = [torch.randn(1, 8, 40, 40, generator=g), torch.randn(1, 16, 20, 20, generator=g)]
    sparse = torch.randn(3, 4, 64, generator=g)
    dense = torch.randn(3, 64, 10, 10, generator=g)
    pe = model.prompt_encoder.get_dense_pe()
    (ma, ia), (mb, ib) = _both(
        model, lambda: model.mask_decoder(emb, pe, sparse, dense, True, high_res_features=high)
    )
    torch.testing.assert_close(ma, mb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ia, ib, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("high_res", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_decoder_shared_image_terms_are_cached_and_invalidated(high_res, layout):
    """No mask input on one image: image + dense + PE are computed once per embedding and
    shared by B prompts; a new embedding, an in-place edit, another dense vector or another
    PE recompute them; every call equals the plain path."""
    cfg = dataclasses.replace(
        WIDE, mask_decoder=dataclasses.replace(WIDE.mask_decoder, use_high_res_features=high_res)
    )
    model = _model(cfg)
    dec = model.mask_decoder
    g = torch.Generator().manual_seed(5)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    emb = torch.randn(1, 64, 10, 10, generator=g).contiguous(memory_format=fmt)
    high = [torch.randn(1, 8, 40, 40, generator=g), torch.randn(1, 16, 20, 20, generator=g)]
    extra = {"high_res_features": high} if high_res else {}
    sparse = torch.randn(4, 2, 64, generator=g)
    vec = torch.randn(1, 64, 1, 1, generator=g)
    pe = model.prompt_encoder.get_dense_pe()

    def run(dense, e=emb):
        return _both(model, lambda: dec(e, pe, sparse, dense.expand(4, -1, 10, 10), True, **extra))

    def check(dense, e=emb):
        (ma, ia), (mb, ib) = run(dense, e)
        torch.testing.assert_close(ma, mb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ia, ib, atol=1e-4, rtol=1e-4)
        # one prompt at a time gives the same as the batch
        for i in range(4):
            with torch.no_grad():
                m1, _ = dec(e, pe, sparse[i : i + 1], dense.expand(1, -1, 10, 10), True, **extra)
            torch.testing.assert_close(m1[0], ma[i], atol=1e-4, rtol=1e-4)
        return ma

    first = check(vec)
    terms = dec.__dict__["_image_cache"][1]
    projections = dec.__dict__["_first_layer_cache"][1]
    again = check(vec)
    assert dec.__dict__["_image_cache"][1] is terms  # reused
    assert dec.__dict__["_first_layer_cache"][1] is projections
    torch.testing.assert_close(first, again)
    # the first layer's kept projections follow its weights (edited in place: fine-tuning)
    block = dec.transformer.layers[0]
    for lin in (block.cross_attn_token_to_image.k_proj, block.cross_attn_image_to_token.q_proj):
        with torch.no_grad():
            lin.bias.add_(0.5)
        check(vec)
        assert dec.__dict__["_first_layer_cache"][1] is not projections
        projections = dec.__dict__["_first_layer_cache"][1]
    first = check(vec)
    with torch.no_grad():
        emb.mul_(-1.0)  # in place: same tensor object, new version
    flipped = check(vec)
    assert not torch.allclose(flipped, first)
    other = check(vec + 1.0)  # another dense vector
    assert not torch.allclose(other, flipped)
    if high_res:  # the high-res terms are cached too: an in-place edit must show
        with torch.no_grad():
            high[0].mul_(3.0)
            high[1].add_(1.0)
        assert not torch.allclose(check(vec + 1.0), other)
        # under autograd nothing cached at inference is reused: gradients reach the features
        high[1].requires_grad_(True)
        emb.requires_grad_(True)
        with torch.enable_grad():
            masks, _ = dec(emb, pe, sparse, (vec + 1.0).expand(4, -1, 10, 10), True, **extra)
            masks.square().mean().backward()
        assert high[1].grad is not None and high[1].grad.abs().sum() > 0
        assert emb.grad is not None and emb.grad.abs().sum() > 0
    check(vec, torch.randn(1, 64, 10, 10, generator=g))  # another embedding


def test_dense_pe_is_cached_until_the_frequencies_change():
    model = _model(WIDE)
    enc = model.prompt_encoder
    pe = enc.get_dense_pe()
    assert enc.get_dense_pe() is pe
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    state[key] = state[key] * 2.0
    model.load_state_dict(state)  # copies in place
    pe2 = enc.get_dense_pe()
    assert pe2 is not pe and not torch.allclose(pe2, pe)
    fresh = enc.pe_layer(enc.image_embedding_size).unsqueeze(0)
    torch.testing.assert_close(pe2, fresh)


def test_decoder_fast_path_has_gradients():
    model = _model(WIDE).train()
    emb = torch.randn(1, 64, 10, 10, requires_grad=True)
    pe = model.prompt_encoder.get_dense_pe()
    masks, iou = model.mask_decoder(
        emb, pe, torch.randn(2, 3, 64), torch.randn(2, 64, 10, 10), True
    )
    (masks.square().mean() + iou.sum()).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert (
        model.mask_decoder.transformer.layers[1].cross_attn_image_to_token.q_proj.weight.grad
        is not None
    )


@pytest.mark.parametrize("n_masks", [1, 3])
@pytest.mark.parametrize("shape", [(120, 180), (37, 301), (160, 160), (301, 37)])
def test_crop_first_upscaling_is_exact(shape, n_masks):
    """Upscaling to the original size: as two products with per-axis matrices (equal up to
    float rounding), or, above the products' budget, crop-first with several masks handed to
    the kernel channels-last (bit-identical)."""
    from segany.modeling import sam as sam_module
    from segany.transforms import preprocess_shape

    model = _model()
    low = torch.randn(2, n_masks, 40, 40)
    inp = preprocess_shape(*shape, 160)
    fast, plain = _both(model, lambda: model.postprocess_masks(low, inp, shape))
    assert fast.shape == plain.shape == (2, n_masks, *shape)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    sure = plain.abs() > 1e-4
    assert torch.equal((fast > 0)[sure], (plain > 0)[sure])
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as mp:
        mp.setattr(sam_module, "RESIZE_PRODUCT_MACS", 0)
        sam_module._resize_operators.cache_clear()
        fast, plain = _both(model, lambda: model.postprocess_masks(low, inp, shape))
    sam_module._resize_operators.cache_clear()
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("block", [64, 7, 1000])
@pytest.mark.parametrize("shape", [(120, 180), (37, 301), (480, 640)])
def test_banded_resize_is_the_dense_map(monkeypatch, shape, block):
    """The banded per-axis maps (blocks of outputs, each reading only its window of inputs)
    give the products with the whole matrices, and their fused threshold the same masks as
    thresholding the logits, at block sizes from one block per axis down to a few rows."""
    from segany.modeling import sam as sam_module
    from segany.transforms import preprocess_shape

    monkeypatch.setattr(sam_module, "RESIZE_BLOCK", block)
    sam_module._resize_operators.cache_clear()
    try:
        model = _model()
        low = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
        inp = preprocess_shape(*shape, 160)
        ops = sam_module._resize_operators(
            40, 160, *inp, *shape, torch.float32, torch.device("cpu")
        )
        assert ops is not None
        rows, cols, _ = ops
        if block < shape[0]:
            assert len(rows.weights) > 1 and rows.width < rows.n  # really banded
        # the whole matrices: the maps applied to identities
        dense_r = rows.apply(torch.eye(rows.n), -2)  # out_h x n
        dense_c = cols.apply(torch.eye(cols.n), -1)  # n x out_w, i.e. cols^T
        m = low[..., : rows.n, : cols.n].double()
        want = dense_r.double() @ m @ dense_c.double()
        with torch.no_grad():
            got = model.postprocess_masks(low, inp, shape)
            masks = model.postprocess_masks(low, inp, shape, threshold=0.25)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert masks.dtype == torch.bool and torch.equal(masks, got > 0.25)
        _, plain = _both(model, lambda: model.postprocess_masks(low, inp, shape))
        torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
        set_fast_paths(model, False)
        with torch.no_grad():  # the plain path thresholds too
            assert torch.equal(
                model.postprocess_masks(low, inp, shape, threshold=0.25), plain > 0.25
            )
        set_fast_paths(model, True)
    finally:
        sam_module._resize_operators.cache_clear()


@pytest.mark.parametrize("block", [64, 7])
@pytest.mark.parametrize("shape", [(120, 180), (37, 301), (480, 640)])
def test_mask_stats_are_the_thresholded_full_size_logits(monkeypatch, shape, block):
    """``postprocess_mask_stats`` ("segment everything": masks thresholded and counted block
    by block) gives exactly the masks of the float path thresholded at the model's threshold
    and the counts of its logits above each level; None where the banded form is off."""
    from segany.modeling import sam as sam_module
    from segany.transforms import preprocess_shape

    monkeypatch.setattr(sam_module, "RESIZE_BLOCK", block)
    sam_module._resize_operators.cache_clear()
    try:
        model = _model()
        low = torch.randn(5, 40, 40, generator=torch.Generator().manual_seed(2)) * 4
        inp = preprocess_shape(*shape, 160)
        levels = (1.0, -1.0, 0.3)
        with torch.no_grad():
            logits = model.postprocess_masks(low[:, None], inp, shape)[:, 0]
            stats = model.postprocess_mask_stats(low, inp, shape, levels)
        assert stats is not None
        binary, counts = stats
        assert binary.dtype == torch.bool and torch.equal(binary, logits > model.mask_threshold)
        assert counts.shape == (3, 5)
        for k, t in enumerate(levels):
            assert torch.equal(counts[k], (logits > t).sum((-1, -2)))
        set_fast_paths(model, False)
        assert model.postprocess_mask_stats(low, inp, shape, levels) is None
    finally:
        sam_module._resize_operators.cache_clear()


def test_predictor_fast_equals_plain_and_reference(image):
    from segment_anything import SamPredictor

    ours, ref = make_pair(WIDE)
    pb = SamPredictor(ref)
    pb.set_image(image)
    kw = dict(point_coords=np.array([[60.0, 40.0], [100, 90]]), point_labels=np.array([1, 0]))
    expected = pb.predict(**kw, return_logits=True)
    for fast in (True, False):
        set_fast_paths(ours, fast)
        pa = Predictor(ours)
        pa.set_image(image)
        got = pa.predict(**kw, return_logits=True)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    set_fast_paths(ours, True)


def test_optimize_bf16_int8_compile_threads():
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    base = _model()
    with torch.no_grad():
        want = base.encode_image(x)[0]

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        m = segany.optimize(_model(), precision="bf16")
        assert m.encoder_dtype == torch.bfloat16
        with torch.no_grad():
            got = m.encode_image(x)[0]
        assert got.dtype == torch.float32 and cos(got, want) > 0.99
    m = segany.optimize(_model(), quantize="int8")
    with torch.no_grad():
        assert cos(m.encode_image(x)[0], want) > 0.99
    before = torch.get_num_threads()
    try:
        assert segany.optimize(_model(), threads=1) is not None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="precision"):
        segany.optimize(_model(), precision="fp64")
    with pytest.raises(ValueError, match="quantize"):
        segany.optimize(_model(), quantize="int4")


@pytest.mark.slow
def test_optimize_compile_keeps_names_and_values():
    """torch.compile (dynamo tracing with the eager backend: ~30 s, hence slow)."""
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    base = _model()
    with torch.no_grad():
        want = base.encode_image(x)[0]
    names = list(base.state_dict())
    m = segany.optimize(_model(), compile="eager")
    assert list(m.state_dict()) == names  # compiling never renames parameters
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x)[0], want, atol=1e-4, rtol=1e-4)


def test_masks_identical_to_reference_after_optimize(image):
    """The default optimize() (fast paths, fp32) keeps the reference's masks."""
    from segment_anything import SamPredictor

    ours, ref = make_pair(TINY)
    segany.optimize(ours)
    pa, pb = Predictor(ours), SamPredictor(ref)
    img = synthetic_image(90, 140, seed=3)
    pa.set_image(img)
    pb.set_image(img)
    for box in ([10, 10, 100, 80], [0, 0, 140, 90]):
        ma, _, _ = pa.predict(box=np.array(box))
        mb, _, _ = pb.predict(box=np.array(box))
        assert all(mask_iou(a, b) >= 0.999 for a, b in zip(ma, mb))


def test_lite_encoder_folded_backbone_equals_plain():
    """segany-lite at inference: a batch-norm-folded, channels-last copy of the backbone
    gives the module's own features, and is rebuilt when a weight changes."""
    from conftest import TINY_LITE

    model = randomize_(build_sam(TINY_LITE), 2).eval()
    for m in model.image_encoder.backbone.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    enc = model.image_encoder
    x = torch.randn(2, 3, enc.img_size, enc.img_size, generator=torch.Generator().manual_seed(0))

    def check():
        (fe, fh), (pe, ph) = _both(model, lambda: enc(x))
        torch.testing.assert_close(fe, pe, atol=1e-4, rtol=1e-4)
        for a, b in zip(fh, ph):
            assert a.is_contiguous()
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        return fe

    first = check()
    twin = enc.__dict__["_folded"][1]
    check()
    assert enc.__dict__["_folded"][1] is twin  # reused
    with torch.no_grad():
        enc.backbone._blocks[0]._bn1.running_var.mul_(4.0)  # in place: a new version
    assert not torch.allclose(check(), first)
    assert enc.__dict__["_folded"][1] is not twin
    with torch.enable_grad():  # autograd runs the module itself
        out = enc(x.requires_grad_())[0]
    assert out.requires_grad


@pytest.mark.parametrize("high_res", [False, True])
def test_decoder_groups_of_prompts_give_the_whole_batch(high_res):
    """At inference a big batch is decoded in groups under ``group_bytes``: the same masks
    and IoUs as one group (up to float rounding: a matrix product of another height may sum
    in another order), with and without ``iou_floor``; under autograd it is one graph
    whatever the budget."""
    cfg = dataclasses.replace(
        WIDE, mask_decoder=dataclasses.replace(WIDE.mask_decoder, use_high_res_features=high_res)
    )
    model = _model(cfg)
    dec = model.mask_decoder
    g = torch.Generator().manual_seed(9)
    emb = torch.randn(1, 64, 10, 10, generator=g)
    high = [torch.randn(1, 8, 40, 40, generator=g), torch.randn(1, 16, 20, 20, generator=g)]
    extra = {"high_res_features": high} if high_res else {}
    sparse = torch.randn(7, 3, 64, generator=g)
    dense = torch.randn(1, 64, 1, 1, generator=g).expand(7, -1, 10, 10)
    pe = model.prompt_encoder.get_dense_pe()

    def run(group_bytes, **kw):
        dec.group_bytes = group_bytes
        with torch.no_grad():
            return dec(emb, pe, sparse, dense, True, **extra, **kw)

    whole = run(1 << 30)
    for budget in (1, 2 * 100 * 64 * 4, 3 * 100 * 64 * 4):  # groups of 1, 2 and 3 prompts
        for a, b in zip(run(budget), whole):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    floor = float(whole[1].median())
    grouped, one = run(1, iou_floor=floor), run(1 << 30, iou_floor=floor)
    assert torch.equal(grouped[0] == 0, one[0] == 0)  # the same prompts skipped
    for a, b in zip(grouped, one):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dec.group_bytes = 1
    emb.requires_grad_(True)
    masks, _ = dec(emb, pe, sparse, dense, True, **extra)
    masks.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("high_res", [False, True])
@pytest.mark.parametrize("multimask", [True, False])
def test_low_rank_image_tokens_equal_the_dense_path(high_res, multimask):
    """Prompts on one image without a mask input: the transformer keeps the image tokens as
    the image plus a low-rank term per prompt (its products with the image made once and
    kept). The same masks and IoUs as the dense fast path and the plain path, batch = its
    items one by one, with ``iou_floor`` skipping the same prompts; the kept products follow
    in-place edits of any transformer or upscaling weight."""
    cfg = dataclasses.replace(
        WIDE, mask_decoder=dataclasses.replace(WIDE.mask_decoder, use_high_res_features=high_res)
    )
    model = _model(cfg, seed=3)
    dec = model.mask_decoder
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(1, 64, 10, 10, generator=g)
    high = [torch.randn(1, 8, 40, 40, generator=g), torch.randn(1, 16, 20, 20, generator=g)]
    extra = {"high_res_features": high} if high_res else {}
    sparse = torch.randn(5, 2, 64, generator=g)  # 7 tokens: rank 2 x (2 x 7 + 2) = 32 <= 3/4 of 64
    dense = torch.randn(1, 64, 1, 1, generator=g).expand(5, -1, 10, 10)
    pe = model.prompt_encoder.get_dense_pe()

    def run(low_rank, s=sparse, d=dense, **kw):
        dec.low_rank = low_rank
        with torch.no_grad():
            return dec(emb, pe, s, d, multimask, **extra, **kw)

    dense_out = run(False)
    assert "_low_rank_cache" not in dec.__dict__
    low = run(True)
    kept = dec.__dict__["_low_rank_cache"][1]
    for a, b in zip(low, dense_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    set_fast_paths(model, False)
    plain = run(False)
    set_fast_paths(model, True)
    for a, b in zip(low, plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for i in range(5):
        one = run(True, sparse[i : i + 1], dense[:1])
        torch.testing.assert_close(one[0][0], low[0][i], atol=1e-4, rtol=1e-4)
    assert dec.__dict__["_low_rank_cache"][1] is kept  # reused for every prompt

    best = low[1].max(1).values.sort().values
    floor = float(best[1:3].mean())  # between prompts: 2 skipped, 3 kept
    a, b = run(True, iou_floor=floor), run(False, iou_floor=floor)
    assert torch.equal(a[0] == 0, b[0] == 0) and (a[0] == 0).any() and (a[0] != 0).any()
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)

    # the kept products follow the weights they fold (a later layer's LayerNorm, a later
    # layer's projections, the final attention's, the first upscaling's), edited in place
    tf = dec.transformer
    for p in (
        tf.layers[0].norm4.weight,
        tf.layers[1].cross_attn_image_to_token.q_proj.weight,
        tf.final_attn_token_to_image.v_proj.weight,
        dec.output_upscaling[0].weight,
    ):
        with torch.no_grad():
            p.mul_(1.5)
        low, dense_out = run(True), run(False)
        for x, y in zip(low, dense_out):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
        assert dec.__dict__["_low_rank_cache"][1] is not kept
        kept = dec.__dict__["_low_rank_cache"][1]


def test_low_rank_image_tokens_only_where_they_pay():
    """Not for a mask input (the image differs per prompt), not for so many tokens that the
    low-rank term would be as wide as the image, not under autograd."""
    model = _model(WIDE, seed=4)
    dec = model.mask_decoder
    g = torch.Generator().manual_seed(12)
    emb = torch.randn(1, 64, 10, 10, generator=g)
    pe = model.prompt_encoder.get_dense_pe()
    vec = torch.randn(1, 64, 1, 1, generator=g)
    with torch.no_grad():
        dec(emb, pe, torch.randn(2, 20, 64, generator=g), vec.expand(2, -1, 10, 10), True)
        assert "_low_rank_cache" not in dec.__dict__  # 25 tokens: rank 2 x 52 > 3/4 of 64
        dec(emb, pe, torch.randn(2, 2, 64, generator=g), torch.randn(2, 64, 10, 10), True)
        assert "_low_rank_cache" not in dec.__dict__  # a mask input
    with torch.enable_grad():
        masks, _ = dec(emb, pe, torch.randn(2, 2, 64, generator=g), vec.expand(2, -1, 10, 10), True)
        masks.sum().backward()
    assert "_low_rank_cache" not in dec.__dict__
    assert dec.transformer.layers[1].norm4.weight.grad is not None
    with torch.no_grad():
        dec(emb, pe, torch.randn(2, 2, 64, generator=g), vec.expand(2, -1, 10, 10), True)
    assert "_low_rank_cache" in dec.__dict__


def test_set_image_makes_the_decoders_image_products_for_the_first_click(image):
    """The products every click on the image shares are made by ``set_image``; the first
    click reuses them (and gives what a decoder making them itself gives)."""
    model = _model(WIDE, seed=6)
    dec = model.mask_decoder
    pred = Predictor(model)
    pred.set_image(image)
    names = ("_image_cache", "_first_layer_cache", "_low_rank_cache")
    kept = [dec.__dict__[n][1] for n in names]
    kw = dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]))
    got = pred.predict(**kw, return_logits=True)
    assert all(dec.__dict__[n][1] is k for n, k in zip(names, kept))
    for n in names:
        del dec.__dict__[n]
    again = pred.predict(**kw, return_logits=True)
    second = dec.__dict__["_low_rank_cache"][1]
    assert second is not kept[2]
    for a, b in zip(got, again):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    pred.set_image(image[::-1].copy())  # another image: made again
    assert dec.__dict__["_low_rank_cache"][1] is not second
