"""SAM's ViT image encoder: windowed + global attention with decomposed relative positions.

Parameter names equal the official checkpoints' (``image_encoder.blocks.N.attn.qkv`` ...).
Shapes use ``B`` batch, ``H x W`` the token grid (``img_size / patch_size``), ``C`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock, apply_linear, fused_linear


class ImageEncoderViT(nn.Module):
    """``B x 3 x S x S`` normalised image -> ``B x out_chans x S/16 x S/16`` embedding."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        # 1 x H x W x C absolute position embedding, added after patchifying.
        self.pos_embed: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        )
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                norm_eps=norm_eps,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B x H x W x C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))  # B x C x H x W for the convolutions


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> ``B x H x W x C`` tokens."""

    def __init__(self, *, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=(patch_size, patch_size), stride=patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size == 0`` means global attention."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] = (64, 64),
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, eps=norm_eps)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn.fused:
            return self._forward_fast(x)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as the reference path with less work and memory traffic.

        - q, k and v are three products with the thirds of ``qkv`` (same numbers, three
          contiguous tensors a third of the size); attention is fused (see ``Attention``).
        - Windowed blocks project q/k/v on the real tokens only, give the zero padding tokens
          the projection of zero, and run the output projection after cropping the padding
          (all per-token maps): ~15% fewer FLOPs at 1024 px, where 64 x 64 tokens are padded
          to 70 x 70.
        - The MLP runs over bands of ``MLP_CHUNK_TOKENS`` tokens, so its 4x wider hidden
          activation stays small (cache-resident, and never a fresh page-faulted allocation).
        - Linear layers use oneDNN's fused bias + GELU / + residual kernels on CPU.
        """
        b, h, w, c = x.shape
        shortcut = x.reshape(-1, c)  # (a copy only after the NCHW patch embedding)
        y = self.norm1(x)
        windowed = self.window_size > 0
        y = self._windowed_attention(y) if windowed else self.attn.attend_grid(y)
        flat = apply_linear(y.reshape(-1, c), self.attn.proj, residual=shortcut)
        mlp = self.mlp
        exact_gelu = type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], MLP_CHUNK_TOKENS):
            band = flat[i : i + MLP_CHUNK_TOKENS]
            hidden = self.norm2(band)
            if exact_gelu:
                hidden = apply_linear(hidden, mlp.lin1, gelu=True)
            else:
                hidden = mlp.act(mlp.lin1(hidden))
            out[i : i + MLP_CHUNK_TOKENS] = apply_linear(hidden, mlp.lin2, residual=band)
        return out.view(b, h, w, c)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C`` normed tokens -> attention output before ``proj``, same shape."""
        attn, ws = self.attn, self.window_size
        b, h, w, c = x.shape
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws
        pad_values = attn.project_qkv(x.new_zeros(1, c)) if pad_h or pad_w else None
        parts = []
        for i, t in enumerate(attn.project_qkv(x)):  # each B x H x W x C
            if pad_values is not None:
                # A zero padding token projects to the bias: pad with the projection of zero.
                padded = pad_values[i].reshape(c).expand(b, hp, wp, c).clone()
                padded[:, :h, :w] = t
                t = padded
            # B x Hp x Wp x C -> (B*nW) x heads x ws*ws x d
            t = t.view(b, nh, ws, nw, ws, attn.num_heads, -1).permute(0, 1, 3, 5, 2, 4, 6)
            parts.append(t.reshape(b * nh * nw, attn.num_heads, ws * ws, -1))
        out = attn.attend(parts[0], parts[1], parts[2], (ws, ws))  # (B*nW) x ws*ws x C
        out = out.view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, hp, wp, c)[:, :h, :w]


#: Tokens per band in the fast MLP (768-wide ViT-B: a 12 MB hidden activation per band).
MLP_CHUNK_TOKENS = 1024


class Attention(nn.Module):
    """Multi-head attention over a ``B x H x W x C`` grid with decomposed relative positions.

    Two paths compute the same function: the reference path materialises the attention
    matrix like Meta's code; the fused path (default) hands the relative-position bias to
    ``scaled_dot_product_attention`` as an additive mask. ``fused`` switches per module.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.fused = True
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            # (2*size - 1) x head_dim tables, one per axis.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if not self.fused:
            qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
            # Reference path: (B*heads) x N x d tensors and an explicit attention matrix.
            q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * self.num_heads, h * w, -1).unbind(0)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                attn = attn + self._rel_pos_bias(q, (h, w))
            out = attn.softmax(dim=-1) @ v
            out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4)
            return self.proj(out.reshape(b, h, w, -1))
        return self.proj(self.attend_grid(x))

    def attend_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Fused path: ``B x H x W x C`` tokens -> attention output before ``proj``."""
        b, h, w, c = x.shape
        # B x heads x N x d views of the three projections
        q, k, v = (
            t.view(b, h * w, self.num_heads, -1).transpose(1, 2) for t in self.project_qkv(x)
        )
        return self.attend(q, k, v, (h, w)).view(b, h, w, c)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``... x C`` tokens -> q, k, v, each ``... x C``.

        Three products with the thirds of ``qkv.weight`` rather than one: the same numbers
        (every output column is its own dot product) in three contiguous tensors a third of
        the size. Modules swapped in for ``qkv`` (e.g. quantised) run whole and are split.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if type(self.qkv) is nn.Linear:
            weights = self.qkv.weight.chunk(3)
            biases = [None] * 3 if self.qkv.bias is None else self.qkv.bias.chunk(3)
            return tuple(  # type: ignore[return-value]
                fused_linear(flat, wt, bt).view(*shape[:-1], -1) for wt, bt in zip(weights, biases)
            )
        return tuple(t.contiguous() for t in self.qkv(x).chunk(3, dim=-1))  # type: ignore[return-value]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Fused attention of ``B x heads x N x d`` q, k, v over an ``H x W`` grid ->
        ``B x N x heads*d``, before the output projection."""
        b, _, n, _ = q.shape
        if self.use_rel_pos:
            out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, size, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, -1)

    def _rel_pos_bias(self, q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B*heads) x (H*W) x (H*W)`` additive bias from the decomposed position tables."""
        h, w = size
        rh = get_rel_pos(h, h, self.rel_pos_h)  # H x H x d
        rw = get_rel_pos(w, w, self.rel_pos_w)  # W x W x d
        bn, _, dim = q.shape
        r_q = q.reshape(bn, h, w, dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)  # bias by key row
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)  # bias by key column
        bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # Bn x H x W x H x W
        return bias.reshape(bn, h * w, h * w)


#: Largest relative-position bias (elements) handed to one attention call. Beyond it the
#: attention runs in groups of windows, heads or query rows: the bias of one 64 x 64 global
#: block is 12 x 4096 x 4096 floats (805 MB), one head's is 67 MB. Each call has a fixed
#: cost, but a bias that stays in cache between being written and read is faster: 16 M
#: (a whole head) -> 4 M (16 of its 64 query rows) took ViT-B's global attention from 455
#: to 340-380 ms a block and the windowed one from 64 to 50 ms (2 cores, same results).
REL_POS_BLOCK_ELEMENTS = 1 << 22


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias) v`` with SAM's decomposed relative-position bias.

    ``q, k, v`` are ``B x heads x N x d`` (any strides) over an ``H x W`` grid. The bias of
    query ``(i, j)`` and key ``(k, l)`` is ``q . Rh[i, k] + q . Rw[j, l]``; it is handed to
    ``scaled_dot_product_attention`` as an additive mask, at most ``REL_POS_BLOCK_ELEMENTS``
    at a time, and never kept whole.
    """
    b, nh, n, d = q.shape
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # H x H x d
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # W x W x d
    rq = q.reshape(b, nh, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)  # B x heads x H x W x H (key row)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)  # B x heads x H x W x W (key column)
    budget = REL_POS_BLOCK_ELEMENTS
    per_head = n * n
    bs = max(1, min(b, budget // (nh * per_head)))  # windows (batch items) per call
    hs = nh if bs > 1 or nh * per_head <= budget else max(1, min(nh, budget // per_head))
    rows = h if hs > 1 or per_head <= budget else max(1, min(h, budget // (w * n)))
    if torch.compiler.is_compiling():  # one bias, left to the compiler to fuse
        bias = (rel_h[..., None] + rel_w[..., None, :]).contiguous()
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.view(b, nh, n, n), scale=scale
        )
    if bs >= b and hs >= nh and rows >= h:
        bias = q.new_empty(b, nh, h, w, h, w)
        torch.add(rel_h[..., None], rel_w[..., None, :], out=bias)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.view(b, nh, n, n), scale=scale
        )
    out = q.new_empty(b, nh, n, v.shape[-1])
    workspace = q.new_empty(min(b, bs) * min(nh, hs) * min(h, rows) * w * n)
    for b0 in range(0, b, bs):
        bb = slice(b0, b0 + bs)
        for h0 in range(0, nh, hs):
            hh = slice(h0, h0 + hs)
            for r0 in range(0, h, rows):
                rr, qq = slice(r0, r0 + rows), slice(r0 * w, (r0 + rows) * w)
                rel_hc, rel_wc = rel_h[bb, hh, rr], rel_w[bb, hh, rr]
                # B' x heads' x rows x W x H x W, contiguous: the mask layout SDPA reads.
                bias = workspace[: rel_hc.numel() * w].view(*rel_hc.shape[:4], h, w)
                torch.add(rel_hc[..., None], rel_wc[..., None, :], out=bias)
                out[bb, hh, qq] = F.scaled_dot_product_attention(
                    q[bb, hh, qq],
                    k[bb, hh],
                    v[bb, hh],
                    attn_mask=bias.view(bias.shape[0], bias.shape[1], -1, n),
                    scale=scale,
                )
    return out


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``B x H x W x C`` -> ``(B*nW) x ws x ws x C`` windows (zero-padded), padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair: ``q_size x k_size x d``.

    The table is linearly resized when its length differs from ``2*max(q, k) - 1``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]
