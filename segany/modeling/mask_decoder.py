"""SAM's mask decoder: two-way transformer + hypernetwork MLPs + IoU head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d, fused_linear, tracing
from .transformer import (
    ImageProjections,
    LayerTerms,
    LowRankImage,
    TwoWayAttentionBlock,
    TwoWayTransformer,
    image_tokens,
)

_T = TypeVar("_T")

#: Makes the high-res features of some prompts: ``rows`` (indices into the batch of B
#: prompts, or None for all B) -> ``[len(rows)|1 x C/8 x 4h x 4w, len(rows)|1 x C/4 x 2h x 2w]``
HighResRows = Callable[[torch.Tensor | None], list[torch.Tensor]]


class MaskDecoder(nn.Module):
    """Predicts ``1 + num_multimask_outputs`` masks and their IoU from image + prompt embeddings.

    Token 0 of the mask tokens gives the single-mask output; tokens 1..3 the ambiguity-aware
    multimask output.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        # High-resolution encoder features added inside the upscaling path (as SAM 2 and
        # SAM-HQ do) for sharper boundaries; off for the official SAM checkpoints.
        self.use_high_res_features = use_high_res_features
        #: Fast path (default): the upscaling runs as matrix products in a sub-pixel layout
        #: and only the returned masks are computed. False: the reference computation.
        self.fused = True
        #: Fast path at inference: prompts are decoded in groups whose image-sized activations
        #: (prompts x hw x C floats) stay under this many bytes. Same results up to float
        #: rounding (products of another height may sum in another order). Faster on CPU:
        #: a tensor above glibc's 32 MiB mmap ceiling is fresh memory, a page fault per 4 KiB
        #: (one-off run, 512-px segany-lite "everything", 64 prompts a batch: 4.7 -> 4.3 s with
        #: 4 MiB), while small groups pay the token-side ops once per group.
        #: ``benchmarks/decode_groups.py`` (AVX2 EPYC, medians of 5): 16 MiB against 4 MiB,
        #: 64 ViT-B boxes 0.72-0.79x, 640-px segany-lite "everything" 0.94x; 24 MiB no better.
        self.group_bytes = 16 << 20
        #: Fast path at inference (with ``fused``), for prompts on one image without a mask
        #: input: the image tokens inside the transformer are kept as the image plus a
        #: low-rank term per prompt (:meth:`TwoWayTransformer.forward_low_rank`), so the
        #: image-sized projections of the later layers, the final attention and the first
        #: upscaling product are made once per image. Same results up to float rounding.
        self.low_rank = True

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
        iou_floor: float | None = None,
        high_res_rows: HighResRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns masks ``B x M x 4h x 4w`` (logits) and IoU predictions ``B x M``.

        ``image_embeddings`` is ``1 x C x h x w`` (shared by all B prompts) or ``B x C x h x w``;
        ``high_res_features`` (models with ``use_high_res_features``) are
        ``[1|B x C/8 x 4h x 4w, 1|B x C/4 x 2h x 2w]``. ``iou_floor`` (for callers that drop
        every mask whose predicted IoU is not above it, as the automatic generator does): the
        fast path may skip the upscaling of such masks and leave zeros in their place.
        ``high_res_rows`` (with ``iou_floor``): makes the high-res features of the given
        prompts (indices into the B), for prompts whose features differ (a prompt branch) and
        are worth making only for the masks that get upscaled; used instead of
        ``high_res_features`` where given.
        """
        sl = slice(1, None) if multimask_output else slice(0, 1)
        if high_res_rows is not None and (not self.fused or iou_floor is None):
            high_res_features = high_res_rows(None)
            high_res_rows = None
        if self.fused:
            return self._predict_grouped(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                high_res_features,
                sl,
                iou_floor,
                high_res_rows,
            )
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
        )
        return masks[:, sl], iou_pred[:, sl]

    def prepare(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        n_tokens: int,
    ) -> None:
        """Makes (and keeps) the products of the image that the fast path shares between the
        prompts with this spatially constant dense embedding and ``n_tokens`` tokens (see
        :meth:`_image_terms`, :meth:`_first_layer_terms`, :meth:`_low_rank_terms`); nothing
        where the fast path would not keep them."""
        if not self.fused or self._subpixel_layers() is None or image_embeddings.shape[0] != 1:
            return
        src, pe_tokens, src_with_pe = self._image_terms(
            image_embeddings, image_pe, dense_prompt_embeddings
        )
        if src_with_pe is not None and self._first_layer_terms(src, src_with_pe) is not None:
            self._low_rank_terms(src, pe_tokens, n_tokens)

    def _predict_grouped(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        sl: slice,
        iou_floor: float | None,
        high_res_rows: HighResRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_predict_fast` on groups of at most ``group_bytes`` of activations (see
        there), at inference only: under autograd one graph is kept whole."""
        b = sparse.shape[0]
        _, c, h, w = image_embeddings.shape
        group = max(1, int(self.group_bytes) // (h * w * c * 4))
        if b <= group or torch.is_grad_enabled() or tracing():
            return self._predict_fast(
                image_embeddings,
                image_pe,
                sparse,
                dense,
                high_res_features,
                sl,
                iou_floor,
                high_res_rows,
            )

        def part(t: torch.Tensor, i: int) -> torch.Tensor:
            return t[i : i + group] if t.shape[0] == b and b > 1 else t

        outs = [
            self._predict_fast(
                part(image_embeddings, i),
                image_pe,
                sparse[i : i + group],
                part(dense, i),
                None if high_res_features is None else [part(f, i) for f in high_res_features],
                sl,
                iou_floor,
                None
                if high_res_rows is None
                else _shifted_rows(high_res_rows, i, min(group, b - i)),
            )
            for i in range(0, b, group)
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoU predictions."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        if image_embeddings.shape[0] == b:
            src = image_embeddings
        elif image_embeddings.shape[0] == 1:
            src = image_embeddings.expand(b, -1, -1, -1)
        else:
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} does not match {b} prompts"
            )
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this mask decoder needs high_res_features from its encoder")
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)  # B x C/8 x 4h x 4w
        else:
            upscaled = self.output_upscaling(src)  # B x C/8 x 4h x 4w
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # B x M x C/8
        _, uc, uh, uw = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, uc, uh * uw)).reshape(b, -1, uh, uw)
        return masks, self.iou_prediction_head(iou_token_out)

    def _predict_fast(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None,
        sl: slice,
        iou_floor: float | None = None,
        high_res_rows: HighResRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_masks` for the mask tokens in ``sl`` only, with the upscaling
        (two 2x2 stride-2 transposed convolutions) as matrix products over sub-pixels."""
        layers = self._subpixel_layers()
        if high_res_rows is not None and (layers is None or iou_floor is None):
            high_res_features = high_res_rows(None)
            high_res_rows = None
        if layers is None:
            masks, iou_pred = self.predict_masks(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                high_res_features,
            )
            return masks[:, sl], iou_pred[:, sl]
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} does not match {b} prompts"
            )
        h, w = image_embeddings.shape[-2:]
        src, pe_tokens, src_with_pe = self._image_terms(
            image_embeddings, image_pe, dense_prompt_embeddings
        )
        first = None if src_with_pe is None else self._first_layer_terms(src, src_with_pe)
        keys: torch.Tensor | LowRankImage
        low = None if first is None else self._low_rank_terms(src, pe_tokens, tokens.shape[1])
        if low is not None and first is not None:
            hs, keys = self.transformer.forward_low_rank(src, tokens, first, low[0])
        else:
            hs, keys = self.transformer(src, pe_tokens, tokens, src_with_pe, first)  # B x hw x C
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, sl]
        if iou_floor is not None and not torch.is_grad_enabled():
            rows = (iou_pred > iou_floor).any(1).nonzero()[:, 0]
            if len(rows) < b:  # upscale only the prompts with a mask that can be kept
                n_out = iou_pred.shape[1]
                out = hs.new_zeros(b, n_out, 4 * h, 4 * w)
                if len(rows):
                    high: list[torch.Tensor] | None
                    if high_res_rows is not None:
                        high = high_res_rows(rows)
                    else:
                        high = high_res_features and [
                            f[rows] if len(f) == b else f for f in high_res_features
                        ]
                    kept = keys.rows(rows) if isinstance(keys, LowRankImage) else keys[rows]
                    out[rows] = self._upscale(layers, hs[rows], kept, high, sl, h, w, low)
                return out, iou_pred
        if high_res_rows is not None:
            high_res_features = high_res_rows(None)
        return self._upscale(layers, hs, keys, high_res_features, sl, h, w, low), iou_pred

    def _upscale(
        self,
        layers: tuple[nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU],
        hs: torch.Tensor,
        keys: torch.Tensor | LowRankImage,
        high_res_features: list[torch.Tensor] | None,
        sl: slice,
        h: int,
        w: int,
        low: tuple[list[LayerTerms], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Tokens and image keys after the transformer -> the masks in ``sl``, ``B x M x 4h x
        4w``: the hypernetwork MLPs and the upscaling (``layers``, see
        :meth:`_subpixel_layers`) as sub-pixel matrix products. With the keys as a
        :class:`LowRankImage`, ``low`` is :meth:`_low_rank_terms`' (the image's product with
        the first upscaling weights)."""
        b, c = hs.shape[0], hs.shape[2]
        token_ids = range(self.num_mask_tokens)[sl]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in token_ids], dim=1
        )  # B x M x C/8

        # ConvTranspose2d(k=2, s=2): out[o, 2i+di, 2j+dj] = sum_c x[c, i, j] W[c, o, di, dj] + b[o]
        # = one product with W as C x (di, dj, o); the result is B x h x w x 2 x 2 x C/4.
        dc1, ln1, act1, dc2, act2 = layers
        c1, c2 = dc1.out_channels, dc2.out_channels
        w1 = dc1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # (di, dj, o) x C
        b1 = None if dc1.bias is None else dc1.bias.repeat(4)
        # The second one in two halves by its row offset di2: half di2 gives the sub-pixels
        # (dj2, o), so its masks come out as whole rows 4i + 2di1 + di2 of the image (copied
        # into place in runs of 2 x 2 pixels, not the 2-element runs of one 16-sub-pixel set).
        w2 = dc2.weight.permute(2, 3, 1, 0).reshape(2, 2 * c2, c1)  # di2 x (dj2, o) x C/4
        b2 = None if dc2.bias is None else dc2.bias.repeat(2)
        inplace = not torch.is_grad_enabled()
        hr0 = None
        if self.use_high_res_features:
            if high_res_features is None:
                raise ValueError("this mask decoder needs high_res_features from its encoder")
            # the high-res features in the sub-pixel layout, biases folded in
            hr0, hr1 = self._high_res_terms(high_res_features, h, w, b1, b2)
            y = self._first_upscaling(keys, w1, None, low).view(b, h * w, 4 * c1)
            y = (y.add_(hr1) if inplace else y + hr1).view(b, h, w, 2, 2, c1)
        else:
            y = self._first_upscaling(keys, w1, b1, low).view(b, h, w, 2, 2, c1)
        y = F.layer_norm(y, (c1,), ln1.weight, ln1.bias, ln1.eps)
        y = (torch.ops.aten.gelu_(y) if inplace else act1(y)).reshape(-1, c1)
        halves = []
        for di2 in range(2):
            if hr0 is not None:
                z = fused_linear(y, w2[di2]).view(b, h * w * 4, 2 * c2)
                z = z.add_(hr0[:, di2]) if inplace else z + hr0[:, di2]
                z = torch.ops.aten.gelu_(z) if inplace else act2(z)
            else:
                z = fused_linear(y, w2[di2], b2, gelu=True)
            # B x M x (i, j, di1, dj1, dj2) -> B x M x (i, di1, j, dj1, dj2)
            masks = hyper_in @ z.view(b, h * w * 8, c2).transpose(1, 2)
            m = masks.shape[1]
            halves.append(masks.view(b, m, h, w, 2, 2, 2).permute(0, 1, 2, 4, 3, 5, 6))
        return torch.stack(halves, dim=4).view(b, -1, 4 * h, 4 * w)  # (i, di1, di2, j, dj1, dj2)

    @staticmethod
    def _first_upscaling(
        keys: torch.Tensor | LowRankImage,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        low: tuple[list[LayerTerms], torch.Tensor] | None,
    ) -> torch.Tensor:
        """The first transposed convolution as ``keys @ w1^T + b1``, ``B x hw x 4*C/4``: for
        a :class:`LowRankImage`, the image's product (``low[1]``, made once) scaled per token
        plus the low-rank term's."""
        if not isinstance(keys, LowRankImage):
            return fused_linear(keys.reshape(-1, keys.shape[2]), w1, b1)
        assert low is not None
        wr = w1 @ keys.right.transpose(1, 2)  # B x 4*C/4 x k
        # item by item (each its own product), through oneDNN where it can
        ys = [fused_linear(u, r, b1) for u, r in zip(keys.left, wr)]
        y = ys[0].unsqueeze(0) if len(ys) == 1 else torch.stack(ys)
        return y.addcmul_(low[1], keys.scale)

    def _low_rank_terms(
        self, src: torch.Tensor, pe: torch.Tensor, n_tokens: int
    ) -> tuple[list[LayerTerms], torch.Tensor] | None:
        """For :meth:`TwoWayTransformer.forward_low_rank` on the shared image ``src`` (with
        ``pe``), when that path applies and pays (the low-rank term stays well narrower than
        the image: its rank, depth x (heads x tokens + 2), at most 3/4 of C): its
        :meth:`~TwoWayTransformer.low_rank_terms` and the image's product with the first
        upscaling weights, kept for the next prompts on the same image. None otherwise."""
        tf = self.transformer
        if not (self.low_rank and type(tf) is TwoWayTransformer and tf.layers):
            return None
        if not all(type(b) is TwoWayAttentionBlock for b in tf.layers):
            return None
        attns = [tf.final_attn_token_to_image]
        for block in tf.blocks():
            attns += [block.cross_attn_token_to_image, block.cross_attn_image_to_token]
        if not all(a.fused and a._plain_linears() for a in attns):
            return None
        c = src.shape[2]
        # Measured (2 threads): ViT-B (C 256) gains 4-10 % at rank 116-164 (1-4 clicks,
        # benchmarks/decode_low_rank.py); segany-lite (C 128) lost 10 % at rank 116 (a
        # one-off run with this gate bypassed).
        if 4 * len(tf.layers) * (tf.num_heads * n_tokens + 2) > 3 * c:
            return None
        dc1 = self.output_upscaling[0]
        assert isinstance(dc1, nn.ConvTranspose2d)  # checked by the caller's fast path
        params = [*tf.parameters(), dc1.weight]
        key: tuple[Any, ...] = (src, pe, *(t._version for t in params))

        def compute() -> tuple[list[LayerTerms], torch.Tensor]:
            w1 = dc1.weight.permute(2, 3, 1, 0).reshape(-1, c)
            terms, diag = tf.low_rank_terms(src, pe)
            return terms, src @ (w1 * diag).t()

        return self._memo("_low_rank_cache", key, compute)

    def _image_terms(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(image + dense prompt, PE, image + dense + PE)`` as ``1|B x hw x C`` tokens.

        With a spatially constant dense prompt (no mask input) on one shared image, the three
        are the same for every prompt: they are computed once, kept for the next call on the
        same embedding (inference only), and never copied per prompt.
        """
        shared = (
            image_embeddings.shape[0] == 1
            and dense.stride(-1) == 0
            and dense.stride(-2) == 0
            and (dense.shape[0] == 1 or dense.stride(0) == 0)
        )
        if not shared:
            src = image_tokens(image_embeddings + dense)
            return src, image_tokens(image_pe), None
        vec = dense[:1, :, :1, :1]
        key: tuple[Any, ...] = (
            image_embeddings,
            image_embeddings._version,
            image_pe,
            image_pe._version,
        )
        key += (tuple(vec.flatten().tolist()),)

        def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            src = image_tokens(image_embeddings + vec)
            pe = image_tokens(image_pe)
            return src, pe, src + pe

        return self._memo("_image_cache", key, compute)

    def _first_layer_terms(
        self, src: torch.Tensor, src_with_pe: torch.Tensor
    ) -> ImageProjections | None:
        """The first transformer layer's projections of the shared image tokens (see
        :meth:`TwoWayAttentionBlock.image_projections`), kept for the next prompts on the same
        image. Only at inference (computing them for one call would cost more than it saves)
        and only for SAM's layer with plain, fast-path attention."""
        if torch.is_grad_enabled() or tracing():
            return None
        layers = getattr(self.transformer, "layers", None)
        if not layers or type(layers[0]) is not TwoWayAttentionBlock:
            return None
        block = layers[0]
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        if not (t2i.fused and i2t.fused and t2i._plain_linears() and i2t._plain_linears()):
            return None
        weights = (t2i.k_proj, t2i.v_proj, i2t.q_proj)
        key: tuple[Any, ...] = (src, src_with_pe)
        key += tuple(t._version for m in weights for t in (m.weight, m.bias))
        return self._memo(
            "_first_layer_cache", key, lambda: block.image_projections(src, src_with_pe)
        )

    def _high_res_terms(
        self,
        high_res_features: list[torch.Tensor],
        h: int,
        w: int,
        b1: torch.Tensor | None,
        b2: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The high-res features rearranged to the upscaling's sub-pixel layout, plus the
        transposed convolutions' biases: ``1|B x 2 x hw*4 x 2*C/8`` (by the second one's row
        offset, see :meth:`_upscale`) and ``1|B x hw x 4*C/4``.
        Kept for the next call on the same features (inference only), as they do not depend
        on the prompt."""
        feat_s0, feat_s1 = high_res_features
        bias1, bias2 = self.output_upscaling[0].bias, self.output_upscaling[3].bias
        key: tuple[Any, ...] = (feat_s0, feat_s0._version, feat_s1, feat_s1._version)
        key += tuple(None if t is None else t._version for t in (bias1, bias2))

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            c1, c2 = feat_s1.shape[1], feat_s0.shape[1]
            # 1|B x C/4 x 2h x 2w -> 1|B x h x w x (2 x 2 x C/4)
            hr1 = feat_s1.view(-1, c1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1)
            hr1 = hr1.reshape(-1, h * w, 4 * c1)
            # (di2, i, j, di1, dj1, dj2) is pixel (4i + 2di1 + di2, 4j + 2dj1 + dj2)
            hr0 = feat_s0.view(-1, c2, h, 2, 2, w, 2, 2).permute(0, 4, 2, 5, 3, 6, 7, 1)
            hr0 = hr0.reshape(-1, 2, h * w * 4, 2 * c2)
            if b1 is not None:
                hr1 = hr1 + b1
            if b2 is not None:
                hr0 = hr0 + b2
            return hr0.contiguous(), hr1.contiguous()

        return self._memo("_high_res_cache", key, compute)

    def _memo(self, name: str, key: tuple[Any, ...], compute: Callable[[], _T]) -> _T:
        """``compute()``, kept under ``name`` for the next call with the same ``key`` (tensors
        compared by identity, the rest by value). Only at inference: under autograd, tracing
        or compilation it is neither kept nor reused, so gradients always flow."""
        if torch.is_grad_enabled() or tracing():
            return compute()
        cached = self.__dict__.get(name)
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        value = compute()
        self.__dict__[name] = (key, value)
        return value

    def _subpixel_layers(
        self,
    ) -> tuple[nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU] | None:
        """The upscaling layers when they are SAM's (2x2 stride-2 deconvs, LayerNorm2d,
        exact GELUs), which the fast path reproduces; None for anything else."""
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        if (
            isinstance(dc1, nn.ConvTranspose2d)
            and isinstance(dc2, nn.ConvTranspose2d)
            and dc1.kernel_size == dc1.stride == dc2.kernel_size == dc2.stride == (2, 2)
            and type(ln1) is LayerNorm2d
            and type(act1) is nn.GELU
            and type(act2) is nn.GELU
            and act1.approximate == act2.approximate == "none"
        ):
            return dc1, ln1, act1, dc2, act2
        return None


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Cache keys: the same tensor objects (identity) and equal other entries."""
    return len(a) == len(b) and all(
        x is y if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b)
    )


def _shifted_rows(fn: HighResRows, start: int, n: int) -> HighResRows:
    """``fn`` for the group of ``n`` prompts from ``start``: rows counted within the group."""

    def rows_of_group(rows: torch.Tensor | None) -> list[torch.Tensor]:
        return fn(torch.arange(start, start + n) if rows is None else rows + start)

    return rows_of_group
