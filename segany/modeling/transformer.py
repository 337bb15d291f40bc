"""SAM's two-way transformer: tokens attend to the image and the image attends back."""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        first_keys_with_pe: torch.Tensor | None = None,
        first_layer_image: ImageProjections | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``B x C x h x w`` (+ its PE), tokens ``B x T x C`` -> (tokens, ``B x hw x C``).

        The image and its PE may also come as ``B x hw x C`` tokens, and with batch 1 for B
        prompts (shared, never copied B times). ``first_keys_with_pe`` is ``image + PE`` as
        tokens when the caller has it already (the same for every prompt on one image), and
        ``first_layer_image`` the first layer's projections of it
        (:meth:`TwoWayAttentionBlock.image_projections`), kept by a caller that decodes many
        prompts on one image.
        """
        if image_embedding.dim() == 4:
            image_embedding = image_tokens(image_embedding)
        if image_pe.dim() == 4:
            image_pe = image_tokens(image_pe)
        queries, keys = point_embedding, image_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries,
                keys,
                query_pe=point_embedding,
                key_pe=image_pe,
                keys_with_pe=first_keys_with_pe if i == 0 else None,
                projected=first_layer_image if i == 0 else None,
                own_keys=i > 0,  # the previous layer's output, not the caller's image
            )
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + image_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        if keys.shape[0] != queries.shape[0]:  # depth 0 with a shared image
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys

    def blocks(self) -> list[TwoWayAttentionBlock]:
        """The layers, typed."""
        return [cast(TwoWayAttentionBlock, b) for b in self.layers]

    def low_rank_terms(
        self, src: torch.Tensor, pe: torch.Tensor
    ) -> tuple[list[LayerTerms], torch.Tensor]:
        """The products of one image (``src``, its ``pe``: ``1 x hw x C`` tokens) that
        :meth:`forward_low_rank` needs, one :class:`LayerTerms` per layer after the first, then
        the final attention's: the image projected by each attention's image-side weights,
        with the LayerNorm weights that scale it by then folded in (see
        :class:`LowRankImage`). Also the product of all the layers' last LayerNorm weights,
        which scales the image term of the output. Computed once per image, for every prompt
        on it."""
        e, p = src[0], pe[0]
        terms = []
        diag = torch.ones_like(e[0])
        for i, layer in enumerate(self.blocks()):
            if i:
                t2i = layer.cross_attn_token_to_image
                terms.append(_layer_terms(t2i, layer.cross_attn_image_to_token, e, p, diag))
            diag = diag * layer.norm4.weight
        terms.append(_layer_terms(self.final_attn_token_to_image, None, e, p, diag))
        return terms, diag

    def forward_low_rank(
        self,
        src: torch.Tensor,
        point_embedding: torch.Tensor,
        first_layer_image: ImageProjections,
        terms: list[LayerTerms],
    ) -> tuple[torch.Tensor, LowRankImage]:
        """:meth:`forward` (inference) for B prompts on one image ``src`` (``1 x hw x C``
        tokens) whose products with the first layer (:meth:`TwoWayAttentionBlock.image_projections`)
        and the later ones (:meth:`low_rank_terms`, with its PE) are given; the output image
        tokens come as a :class:`LowRankImage`.

        Each layer adds to the image tokens a term of rank heads x tokens (the image's
        attention to the few tokens) and LayerNorms the sum. So every later use of the image
        tokens (the next layers' attention, the final attention, the upscaling) is the
        image's own product, made once per image (:meth:`low_rank_terms`), plus a product of
        that low rank: a prompt's ``hw x C x C`` projections become ``hw x rank x C``. The
        same function as :meth:`forward`, up to float rounding.
        """
        image = LowRankImage.of(src, point_embedding.shape[0])
        queries, keys = point_embedding, src
        for i, layer in enumerate(self.blocks()):
            queries, keys, image = layer.forward_low_rank(
                queries,
                keys,
                image,
                point_embedding,
                first_layer_image if i == 0 else None,
                terms[i - 1] if i else None,
            )
        final = terms[-1]
        attn_out = self.final_attn_token_to_image.attend_low_rank(
            queries + point_embedding, image, final.keys_t, final.values
        )
        return self.norm_final_attn(queries + attn_out), image


def image_tokens(x: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` -> contiguous ``B x hw x C``. Every later elementwise op and
    LayerNorm on a transposed view would run 5-20x slower (a channels-last input is free)."""
    return x.flatten(2).permute(0, 2, 1).contiguous()


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token cross-attention."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        keys_with_pe: torch.Tensor | None = None,
        projected: ImageProjections | None = None,
        own_keys: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys`` (and ``key_pe``, ``keys_with_pe``) may have batch 1 for B queries.
        ``projected``: :meth:`image_projections` of these ``keys`` (and ``keys_with_pe``).
        ``own_keys``: ``keys`` is a temporary of the caller's, which inference may overwrite."""
        queries = self._self_attend(queries, query_pe)

        q = queries + query_pe
        k = keys + key_pe if keys_with_pe is None else keys_with_pe
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if projected is None:
            attn_out = t2i(q=q, k=k, v=keys)
        else:
            attn_out = t2i.attend_projected(q, projected.keys_t, projected.values)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe  # keys are unchanged since k was computed
        if projected is None:
            inplace = own_keys and not torch.is_grad_enabled()
            keys = self.norm4(i2t(q=k, k=q, v=queries, residual=keys, residual_inplace=inplace))
        else:
            keys = self.norm4(i2t.attended_by_projected(projected.queries_t, q, queries, keys))
        return queries, keys

    def _self_attend(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """The tokens' self-attention and its LayerNorm."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        return self.norm1(queries)

    def forward_low_rank(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        image: LowRankImage,
        query_pe: torch.Tensor,
        projected: ImageProjections | None,
        terms: LayerTerms | None,
    ) -> tuple[torch.Tensor, torch.Tensor, LowRankImage]:
        """:meth:`forward` (inference) with the image tokens also as ``image`` (see
        :meth:`TwoWayTransformer.forward_low_rank`): the first layer with ``projected`` (its
        image projections), a later one with ``terms``. Returns the queries, the image tokens
        and them as a :class:`LowRankImage`."""
        queries = self._self_attend(queries, query_pe)
        q = queries + query_pe
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if projected is not None:
            attn_out = t2i.attend_projected(q, projected.keys_t, projected.values)
        else:
            assert terms is not None and terms.queries_t is not None
            attn_out = t2i.attend_low_rank(q, image, terms.keys_t, terms.values)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        if projected is not None:
            scores_t = i2t.project_scores(projected.queries_t, q)
        else:
            assert terms is not None and terms.queries_t is not None
            scores_t = i2t.low_rank_scores(image, terms.queries_t, q)
        attn, f = i2t._few_keys_factors(scores_t, queries)
        # the image tokens plus their attention to the tokens (not in place: the first
        # layer's keys are the caller's image)
        x = torch.baddbmm(keys, attn.transpose(1, 2), f)
        norm = self.norm4
        # (the statistics alone, from var_mean, would cost 10x the whole LayerNorm)
        new_keys, mean, rstd = torch.native_layer_norm(
            x, norm.normalized_shape, norm.weight, norm.bias, norm.eps
        )
        return queries, new_keys, image.normed(attn, f, mean, rstd, norm.weight, norm.bias)

    def image_projections(self, keys: torch.Tensor, keys_with_pe: torch.Tensor) -> ImageProjections:
        """The projections of this block that see the image tokens only (``1 x hw x C``, no
        prompt): worth keeping when the image is the block's input (the first layer) and many
        prompts are decoded on it. Each later prompt then saves the ``hw x C`` products of
        :meth:`Attention._few_queries` and half of :meth:`Attention._few_keys`."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return ImageProjections(
            keys_t=t2i.heads(t2i.k_proj(keys_with_pe)).transpose(-1, -2).contiguous(),
            values=t2i.heads(t2i.v_proj(keys)),
            queries_t=i2t.heads(i2t.q_proj(keys_with_pe)).transpose(-1, -2).contiguous(),
        )


class ImageProjections(NamedTuple):
    """One image's projections in a :class:`TwoWayAttentionBlock` (see ``image_projections``):
    token->image keys transposed, ``1 x heads x d x hw``, and values ``1 x heads x hw x d``;
    image->token queries transposed, ``1 x heads x d x hw``."""

    keys_t: torch.Tensor
    values: torch.Tensor
    queries_t: torch.Tensor


class LayerTerms(NamedTuple):
    """One image's products for a transformer layer after the first (or the final
    attention) in :meth:`TwoWayTransformer.forward_low_rank`, per head: token->image keys
    ``heads x d x 2hw`` (the image's, then its PE's), values ``heads x hw x d``, and
    image->token queries like the keys (None for the final attention). The image's carry
    the LayerNorm weights that scale it at that layer (:class:`LowRankImage`), not the
    biases (the keys' drop out of the softmax, the others are added per prompt)."""

    keys_t: torch.Tensor
    values: torch.Tensor
    queries_t: torch.Tensor | None


class LowRankImage(NamedTuple):
    """The image tokens of B prompts on one image ``E`` (``1 x hw x C``) inside the
    transformer, without a ``hw x C`` tensor per prompt:
    ``scale * (E * diag) + left @ right``, where ``scale`` is ``1|B x hw x 1`` (per token),
    ``left`` ``B x hw x k`` and ``right`` ``B x k x C`` with ``k`` a few heads x tokens,
    and ``diag`` (``C``, the product of the LayerNorm weights so far) is folded into the
    image's cached products (:meth:`TwoWayTransformer.low_rank_terms`)."""

    scale: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def of(src: torch.Tensor, b: int) -> LowRankImage:
        """The image itself (scale 1, rank 0) for ``b`` prompts."""
        n, c = src.shape[1], src.shape[2]
        return LowRankImage(src.new_ones(1, n, 1), src.new_zeros(b, n, 0), src.new_zeros(b, 0, c))

    def rows(self, idx: torch.Tensor) -> LowRankImage:
        """The prompts ``idx`` of the B."""
        scale = self.scale if self.scale.shape[0] == 1 else self.scale[idx]
        return LowRankImage(scale, self.left[idx], self.right[idx])

    def normed(
        self,
        attn: torch.Tensor,
        f: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
    ) -> LowRankImage:
        """``LayerNorm(self + attn^T @ f)`` with that sum's per-token ``mean`` and ``rstd``
        (``B x hw x 1``): ``(x - mean) * rstd * weight + bias``, where ``x`` is this image
        plus the rank-``attn.shape[1]`` term ``attn^T f`` (``attn`` ``B x k' x hw``)."""
        b, c = f.shape[0], f.shape[2]
        k, m = self.left.shape[2], attn.shape[1]
        left = rstd.new_empty(b, rstd.shape[1], k + m + 2)
        torch.mul(self.left, rstd, out=left[..., :k])
        torch.mul(attn.transpose(1, 2), rstd, out=left[..., k : k + m])
        torch.mul(mean, rstd, out=left[..., k + m : k + m + 1]).neg_()
        left[..., k + m + 1] = 1
        right = torch.cat(
            [
                self.right * weight,
                f * weight,
                weight.expand(b, 1, c),
                bias.expand(b, 1, c),
            ],
            dim=1,
        )
        return LowRankImage(self.scale * rstd, left, right)


class Attention(nn.Module):
    """Attention with optional down-projection of the embedding size for queries/keys/values.

    ``fused`` selects ``scaled_dot_product_attention`` (default) or the explicit softmax path.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the internal dim ({self.internal_dim})"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.fused = True

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x internal_dim`` -> contiguous ``B x heads x N x d``."""
        return self._split(x).contiguous()

    def attend_projected(
        self, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for queries ``B x Nq x C`` on keys and values given already
        projected, ``1 x heads x d x Nk`` and ``1 x heads x Nk x d`` (shared by the B
        items, never copied). Explicit products: for a few queries they beat SDPA's kernel."""
        b, nq, _ = q.shape
        qh = self._scaled_heads(self.q_proj(q))
        outs = [
            torch.bmm(torch.softmax(torch.bmm(qh[i], keys_t[0]), dim=-1), values[0])
            for i in range(b)
        ]  # item by item: a batch gives exactly its items' results
        out = torch.stack(outs)  # B x heads x Nq x d
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, self.internal_dim))

    def attended_by_projected(
        self,
        queries_t: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` (+ ``residual``) for many queries given already projected and
        transposed, ``1 x heads x d x Nq`` (shared), on a few keys and values ``B x Nk x C``."""
        return self._few_keys_output(self.project_scores(queries_t, k), v, residual)

    def project_scores(self, queries_t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled scores ``B x heads x Nk x Nq`` of many queries given already projected
        (``1 x heads x d x Nq``, see :meth:`attended_by_projected`) on a few keys ``k``."""
        b = k.shape[0]
        # the scale folded into the few keys rather than applied to B x heads x Nk x Nq scores
        kh = self._scaled_heads(self.k_proj(k))  # B x heads x Nk x d
        scores = [kh[i : i + 1] @ queries_t for i in range(b)]  # 1 x heads x Nk x Nq each
        return scores[0] if b == 1 else torch.cat(scores)

    def _scaled_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Projected ``B x N x internal_dim`` -> ``B x heads x N x d`` times ``d^-1/2``."""
        return self.heads(x) / math.sqrt(self.internal_dim // self.num_heads)

    def attend_low_rank(
        self,
        q: torch.Tensor,
        image: LowRankImage,
        keys_t: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` of a few queries ``B x Nq x C`` on ``k = image + PE``,
        ``v = image``, the image tokens as a :class:`LowRankImage` whose image products are
        ``keys_t`` and ``values`` (a :class:`LayerTerms`'). The keys' bias is a constant per
        query, which the softmax ignores; the values' is added once, as each head's weights
        sum to 1."""
        b, nq, _ = q.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        n, k = values.shape[1], image.left.shape[2]
        qh = self._scaled_heads(self.q_proj(q))  # B x h x Nq x d
        p = torch.softmax(_image_scores(qh, image, self.k_proj.weight, keys_t), dim=-1)
        pu = _bmm(p.view(b, h * nq, n), image.left).view(b, h, nq, k)
        rv = (image.right @ self.v_proj.weight.t()).view(b, k, h, d)
        o = torch.einsum("bhqk,bkhd->bhqd", pu, rv)
        ps = p * image.scale.view(-1, 1, 1, n)
        for i in range(b):  # item by item: a batch gives exactly its items' results
            o[i] += torch.bmm(ps[i], values)
        o += self.v_proj.bias.view(h, 1, d)
        return self.out_proj(o.transpose(1, 2).reshape(b, nq, h * d))

    def low_rank_scores(
        self, image: LowRankImage, queries_t: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """Scaled scores ``B x heads x Nk x hw`` of the image tokens as queries (``q =
        image + PE``, a :class:`LowRankImage` whose image products are ``queries_t``) on a
        few keys ``k`` (``B x Nk x C``)."""
        h, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self._scaled_heads(self.k_proj(k))  # B x h x Nk x d
        scores = _image_scores(kh, image, self.q_proj.weight, queries_t)
        return scores.add_(torch.einsum("bhkd,hd->bhk", kh, self.q_proj.bias.view(h, d))[..., None])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
        residual_inplace: bool = False,
    ) -> torch.Tensor:
        """Attention output (``+ residual`` when given, fused into the last product on the
        fast path, and there written into ``residual`` itself with ``residual_inplace``).
        Batches of 1 broadcast against the others."""
        nq, nk = q.shape[1], k.shape[1]
        if self.fused and self._plain_linears():
            # Few tokens on one side: fold the projections of the many-token side into the
            # few tokens (rank heads*tokens instead of internal_dim). Same function, fewer FLOPs.
            if nk * self.num_heads < self.internal_dim and nq > nk:
                return self._few_keys(q, k, v, residual, residual_inplace)
            if nq * self.num_heads < self.internal_dim and nk > nq:
                out = self._few_queries(q, k, v)
                return out if residual is None else residual + out
        b = max(q.shape[0], k.shape[0], v.shape[0])
        q = self._split(self.q_proj(q.expand(b, -1, -1)))  # B x heads x Nq x d
        k = self._split(self.k_proj(k.expand(b, -1, -1)))
        v = self._split(self.v_proj(v.expand(b, -1, -1)))
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            out = torch.softmax(attn, dim=-1) @ v
        _, h, n, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
        return out if residual is None else residual + out

    def _plain_linears(self) -> bool:
        return all(
            type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        )

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Tokens attending to the image (Nq small, Nk large).

        scores_h = Q_h (k Wk_h^T + bk_h)^T = (Q_h Wk_h) k^T + const per query row, and the
        softmax ignores the constant; A_h (v Wv_h^T + bv_h) = (A_h v) Wv_h^T + bv_h as the
        rows of A_h sum to 1. So no ``Nk x internal_dim`` projection is ever computed.
        """
        b, nq, c = q.shape
        h, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).view(b, nq, h, d)
        g = torch.einsum("bqhd,hdc->bhqc", qh, self.k_proj.weight.view(h, d, c)) / math.sqrt(d)
        scores = _bmm(g.reshape(b, h * nq, c), k.transpose(1, 2))  # B x h*Nq x Nk, scaled
        p = _bmm(torch.softmax(scores, dim=-1), v)  # B x h*Nq x C
        o = torch.einsum("bhqc,hdc->bqhd", p.view(b, h, nq, c), self.v_proj.weight.view(h, d, c))
        o = o + self.v_proj.bias.view(h, d)
        return self.out_proj(o.reshape(b, nq, h * d))

    def _few_keys(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
        residual_inplace: bool = False,
    ) -> torch.Tensor:
        """The image attending to the tokens (Nq large, Nk small).

        scores_h = (q Wq_h^T + bq_h) K_h^T = q (Wq_h^T K_h^T) + bq_h K_h^T and
        out = sum_h A_h V_h Wo_h^T + bo: two ``Nq x C x heads*Nk`` products replace the q and
        output projections. Each head's weights sum to 1 over the keys, so ``bo / heads`` added
        to every row of ``V_h Wo_h^T`` is ``bo``, and the residual is the product's input.
        """
        b, nk = k.shape[0], k.shape[1]
        nq, c = q.shape[1], q.shape[2]
        h, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self.k_proj(k).view(b, nk, h, d) / math.sqrt(d)  # the scale, on the few keys
        wq = self.q_proj.weight.view(h, d, c)
        e = torch.einsum("bkhd,hdc->bhkc", kh, wq).reshape(b, h * nk, c)
        e_bias = torch.einsum("bkhd,hd->bhk", kh, self.q_proj.bias.view(h, d)).reshape(b, -1, 1)
        # Transposed scores, B x h*Nk x Nq: the softmax then runs over a strided axis of Nk,
        # far faster than over a contiguous axis of a few elements.
        scores = _bmm(e, q.transpose(1, 2)).add_(e_bias)
        return self._few_keys_output(scores.view(b, h, nk, nq), v, residual, residual_inplace)

    def _few_keys_output(
        self,
        scores_t: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None,
        residual_inplace: bool = False,
    ) -> torch.Tensor:
        """Scaled scores ``B x heads x Nk x Nq`` and values ``B x Nk x C`` (few) -> the
        output, ``sum_h A_h V_h Wo_h^T + bo`` (+ residual) in one product (into ``residual``
        with ``residual_inplace``, when it has the output's shape)."""
        b, _, _, nq = scores_t.shape
        c = v.shape[2]
        attn, f = self._few_keys_factors(scores_t, v)
        if residual is None:
            return attn.transpose(1, 2) @ f
        if (
            residual_inplace
            and residual.shape == (b, nq, c)
            and residual.is_contiguous()
            and residual.dtype == attn.dtype == f.dtype  # not so under autocast
        ):
            return residual.baddbmm_(attn.transpose(1, 2), f)
        return torch.baddbmm(residual, attn.transpose(1, 2), f)

    def _few_keys_factors(
        self, scores_t: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of :meth:`_few_keys_output` as ``attn^T @ f``: the attention weights
        ``B x heads*Nk x Nq`` and ``f = V_h Wo_h^T + bo / heads``, ``B x heads*Nk x C``."""
        b, h, nk, nq = scores_t.shape
        c, d = v.shape[2], self.internal_dim // h
        vh = self.v_proj(v).view(b, nk, h, d)
        attn = torch.softmax(scores_t, dim=2).view(b, h * nk, nq)
        f = torch.einsum("bkhd,chd->bhkc", vh, self.out_proj.weight.view(c, h, d))
        return attn, f.reshape(b, h * nk, c) + self.out_proj.bias / h


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``B x m x k`` and ``B x k x n`` where ``b``'s batch may be 1 (shared,
    never copied). Every item is its own product of the same shape as for a batch of one,
    so a batch gives exactly the results of its items one by one."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = b.expand(a.shape[0], -1, -1)
    return torch.bmm(a, b)


def _image_scores(
    xh: torch.Tensor, image: LowRankImage, weight: torch.Tensor, image_t: torch.Tensor
) -> torch.Tensor:
    """Scores ``B x heads x N x hw`` of a few tokens ``xh`` (``B x heads x N x d``, scaled)
    on ``(image + PE) weight^T`` (no bias), the image tokens as a :class:`LowRankImage` whose
    image products are ``image_t`` (``heads x d x 2hw``: the image's, to be scaled per token,
    then its PE's): the low-rank term's product, then the image's item by item."""
    b, h, nx, d = xh.shape
    k, n = image.left.shape[2], image_t.shape[2] // 2
    rw = (image.right @ weight.t()).view(b, k, h, d)
    g = torch.einsum("bhxd,bkhd->bhxk", xh, rw).reshape(b, h * nx, k)
    scores = _bmm(g, image.left.transpose(1, 2)).view(b, h, nx, n)
    scale = image.scale
    for i in range(b):
        both = torch.bmm(xh[i], image_t)  # heads x N x 2hw
        s = scale[i if scale.shape[0] > 1 else 0].view(1, 1, n)
        scores[i].addcmul_(both[..., :n], s).add_(both[..., n:])
    return scores


def _layer_terms(
    t2i: Attention, i2t: Attention | None, e: torch.Tensor, pe: torch.Tensor, diag: torch.Tensor
) -> LayerTerms:
    """A :class:`LayerTerms` of the image ``e`` (times ``diag``) and its ``pe``, ``hw x C``:
    for the token->image attention ``t2i`` and, when given, the image->token one ``i2t``."""
    values = e @ (t2i.v_proj.weight * diag).t()
    return LayerTerms(
        keys_t=_with_pe(t2i, e, pe, t2i.k_proj.weight, diag),
        values=t2i.heads(values.unsqueeze(0))[0],
        queries_t=None if i2t is None else _with_pe(i2t, e, pe, i2t.q_proj.weight, diag),
    )


def _with_pe(
    attn: Attention, e: torch.Tensor, pe: torch.Tensor, weight: torch.Tensor, diag: torch.Tensor
) -> torch.Tensor:
    """``[image * diag, PE]`` (``hw x C`` each) projected by ``weight`` into ``attn``'s
    heads, ``heads x d x 2hw`` (see :class:`LayerTerms`)."""
    both = torch.cat([e @ (weight * diag).t(), pe @ weight.t()])  # 2hw x internal_dim
    return attn.heads(both.unsqueeze(0))[0].transpose(1, 2).contiguous()
