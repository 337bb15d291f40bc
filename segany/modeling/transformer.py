"""SAM's two-way transformer: tokens attend to the image and the image attends back."""

from __future__ import annotations

import math
from typing import NamedTuple

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
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe if keys_with_pe is None else keys_with_pe
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if projected is None:
            attn_out = t2i(q=q, k=k, v=keys)
        else:
            attn_out = t2i.attend_projected(q, projected.keys, projected.values)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe  # keys are unchanged since k was computed
        if projected is None:
            inplace = own_keys and not torch.is_grad_enabled()
            keys = self.norm4(i2t(q=k, k=q, v=queries, residual=keys, residual_inplace=inplace))
        else:
            keys = self.norm4(i2t.attended_by_projected(projected.queries_t, q, queries, keys))
        return queries, keys

    def image_projections(self, keys: torch.Tensor, keys_with_pe: torch.Tensor) -> ImageProjections:
        """The projections of this block that see the image tokens only (``1 x hw x C``, no
        prompt): worth keeping when the image is the block's input (the first layer) and many
        prompts are decoded on it. Each later prompt then saves the ``hw x C`` products of
        :meth:`Attention._few_queries` and half of :meth:`Attention._few_keys`."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return ImageProjections(
            keys=t2i.heads(t2i.k_proj(keys_with_pe)),
            values=t2i.heads(t2i.v_proj(keys)),
            queries_t=i2t.heads(i2t.q_proj(keys_with_pe)).transpose(-1, -2).contiguous(),
        )


class ImageProjections(NamedTuple):
    """One image's projections in a :class:`TwoWayAttentionBlock` (see ``image_projections``):
    token->image keys and values ``1 x heads x hw x d``; image->token queries transposed,
    ``1 x heads x d x hw``."""

    keys: torch.Tensor
    values: torch.Tensor
    queries_t: torch.Tensor


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
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for queries ``B x Nq x C`` on keys and values given already
        projected, ``1 x heads x Nk x d`` (shared by the B items, never copied)."""
        b, nq, _ = q.shape
        qh = self.heads(self.q_proj(q))
        outs = [
            F.scaled_dot_product_attention(qh[i : i + 1], keys, values) for i in range(b)
        ]  # item by item: a batch gives exactly its items' results
        out = outs[0] if b == 1 else torch.cat(outs)
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
        b = k.shape[0]
        d = self.internal_dim // self.num_heads
        # the scale folded into the few keys rather than applied to B x heads x Nk x Nq scores
        kh = self.heads(self.k_proj(k)) / math.sqrt(d)  # B x heads x Nk x d
        scores = [kh[i : i + 1] @ queries_t for i in range(b)]  # 1 x heads x Nk x Nq each
        scores_t = scores[0] if b == 1 else torch.cat(scores)
        return self._few_keys_output(scores_t, v, residual)

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
        b, h, nk, nq = scores_t.shape
        c, d = v.shape[2], self.internal_dim // h
        vh = self.v_proj(v).view(b, nk, h, d)
        attn = torch.softmax(scores_t, dim=2).view(b, h * nk, nq)
        f = torch.einsum("bkhd,chd->bhkc", vh, self.out_proj.weight.view(c, h, d))
        f = f.reshape(b, h * nk, c) + self.out_proj.bias / h
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


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``B x m x k`` and ``B x k x n`` where ``b``'s batch may be 1 (shared,
    never copied). Every item is its own product of the same shape as for a batch of one,
    so a batch gives exactly the results of its items one by one."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = b.expand(a.shape[0], -1, -1)
    return torch.bmm(a, b)
