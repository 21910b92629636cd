"""FireEdit's region-aware options for our MM-DiT (Zhou et al., arXiv 2503.19839; issue 10).

Three optional parts that :class:`~rededit.models.backbone.EditBackbone` builds only when asked
(``backbone.region_tokens`` / ``backbone.tati`` / ``backbone.hvca``); when off nothing here is created, so
checkpoints of the plain backbone load unchanged and outputs are bit-identical.

* :class:`RegionTokens` — region tokens. FireEdit encodes detector regions of the input image as extra
  tokens so the instruction can be grounded to one object. Here, per box ``b = (x0, y0, x1, y1)``
  (normalised to ``[0, 1]`` of the image): ``RoIAlign`` of Picture 1's latent ``[B, C, h, w]`` inside the box
  (``s × s`` bins) and a sinusoidal embedding of ``(x0, y0, x1, y1, w, h)`` are concatenated and projected
  to the text width ``D_txt``, plus a learned type embedding::

      r_o = W [vec(RoIAlign(z_1, b_o)) ; PE(b_o)] + e_region        r_o ∈ R^{D_txt}

  The tokens join the text stream right after each sample's valid text tokens (padding moves to the end,
  so text RoPE positions, which diffusers assigns by index, do not depend on the batch's padding); the
  text mask is extended with the region mask (``O_max`` per batch, padded and masked).
* :class:`TimeAwareTargetInjection` (TATI) — the strength of the condition stream depends on the noise
  level ("structure early, detail late")::

      c̃ = c ⊙ g(σ),   g(σ) = 1 + tanh(MLP(PE(1000 σ)))   ∈ (0, 2)^{D_txt}

  applied per channel to text (and region) tokens ``[B, L, D_txt]`` before the transformer. The MLP's last
  layer is zero-initialised, so ``g ≡ 1`` at init and a fresh TATI backbone equals the plain one exactly.
  The transformer's ``txt_norm`` is an RMSNorm, so a uniform gain would be normalised away: the gate acts
  as a σ-dependent re-weighting of the condition's channels, which is why it is per channel.
* :class:`HybridVisualCrossAttention` (HVCA) — extra cross-attention from target tokens to a multi-scale
  pyramid of Picture 1 features, inserted after every ``k``-th transformer block (forward hooks on the
  diffusers blocks, which are wrapped, not copied; the per-call pyramid travels in the blocks' arguments, so
  gradient checkpointing recomputes them correctly). The pyramid is Picture 1's packed latent embedded by the
  transformer's own ``img_in`` ``[B, N_1, D]``, average-pooled ×1, ×2, ×4 on its token grid, plus a learned
  scale embedding and fixed 2-D sinusoidal positions (queries get the target grid's)::

      h_tgt ← h_tgt + W_o · Attn(q = LN(h_tgt) + P_tgt, kv = LN(S + e_scale) + P_S)      [B, N_tgt, D]

  ``W_o`` is zero-initialised, so every inserted layer starts as the identity.

Not modelled: FireEdit's VLM (our text encoder is fixed), and its detector — the boxes come from the
manifest (``object_boxes``; the synthetic corpus knows every object) or from a detector stage of the data
engine for real data. Masks are not used (only boxes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rededit.models.packing import pack_latents

Boxes = Sequence[torch.Tensor | None]


def sincos(x: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """Sinusoidal features of values in ``[0, 1]``: ``[..., K] → [..., 2·K·num_freqs]`` (frequencies ``2^i π``)."""
    freqs = (2.0 ** torch.arange(num_freqs, device=x.device, dtype=torch.float32)) * math.pi
    ang = x.float()[..., None] * freqs  # [..., K, F]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


def normalize_boxes(boxes: Boxes | None, hw: Sequence[int]) -> list[torch.Tensor | None] | None:
    """Pixel boxes ``[O, 4]`` (x0, y0, x1, y1) of an ``H × W`` image → ``[0, 1]`` coordinates (None stays None).

    Raises:
        ValueError: a box list that is not ``[O, 4]``.
    """
    if boxes is None:
        return None
    h, w = float(hw[0]), float(hw[1])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out: list[torch.Tensor | None] = []
    for i, b in enumerate(boxes):
        if b is None:
            out.append(None)
            continue
        b = torch.as_tensor(b, dtype=torch.float32)
        if b.numel() % 4 or (b.ndim == 2 and b.shape[1] != 4) or b.ndim > 2:
            raise ValueError(
                f"object_boxes of sample {i} must be [O, 4] (x0, y0, x1, y1), got {tuple(b.shape)}"
            )
        b = b.reshape(-1, 4)
        if not len(b):
            out.append(None)
            continue
        out.append((b / scale.to(b.device)).clamp(0.0, 1.0))
    return out


class RegionTokens(nn.Module):
    """Region tokens ``[B, O_max, D_txt]`` from boxes and Picture 1's latent (module doc).

    Args:
        latent_channels: ``C`` of the latent that is pooled.
        text_dim: ``D_txt`` (the transformer's ``joint_attention_dim``).
        pool_size: RoIAlign bins ``s`` per side.
        num_freqs: frequencies of the box-coordinate embedding.
        max_regions: at most this many boxes per sample (the first ones are kept).
    """

    def __init__(
        self,
        latent_channels: int,
        text_dim: int,
        pool_size: int = 2,
        num_freqs: int = 6,
        max_regions: int = 16,
    ) -> None:
        super().__init__()
        self.latent_channels = int(latent_channels)
        self.pool_size = int(pool_size)
        self.num_freqs = int(num_freqs)
        self.max_regions = int(max_regions)
        in_dim = self.latent_channels * self.pool_size**2 + 6 * 2 * self.num_freqs
        self.proj = nn.Sequential(nn.Linear(in_dim, text_dim), nn.SiLU(), nn.Linear(text_dim, text_dim))
        self.type_embedding = nn.Parameter(torch.zeros(text_dim))
        nn.init.normal_(self.type_embedding, std=0.02)

    def forward(
        self, source: torch.Tensor | None, regions: Boxes, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tokens ``[B, O_max, D_txt]`` and mask ``[B, O_max]`` (None when no sample has a box).

        Args:
            source: Picture 1's latent ``[B, C, h, w]`` (None for T2I: only the box embedding is used).
            regions: per sample ``[O_i, 4]`` boxes in ``[0, 1]`` (x0, y0, x1, y1) or None.
            batch_size: ``B``.
        """
        from torchvision.ops import roi_align

        if len(regions) != batch_size:
            raise ValueError(f"regions has {len(regions)} entries for a batch of {batch_size}")
        counts = [0 if r is None else min(int(r.shape[0]), self.max_regions) for r in regions]
        o_max = max(counts, default=0)
        if o_max == 0:
            return None
        dtype = self.type_embedding.dtype
        device = self.type_embedding.device
        boxes = torch.cat(
            [r[:n].to(device=device, dtype=torch.float32) for r, n in zip(regions, counts) if n]
        )
        owner = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(counts) if n])
        wh = boxes[:, 2:] - boxes[:, :2]
        coords = sincos(torch.cat([boxes, wh], dim=1), self.num_freqs)  # [K, 12·F]
        k = boxes.shape[0]
        if source is not None:
            if source.ndim != 4 or source.shape[1] != self.latent_channels:
                raise ValueError(
                    f"source latent must be [B, {self.latent_channels}, h, w], got {tuple(source.shape)}"
                )
            h, w = source.shape[-2:]
            scale = torch.tensor([w, h, w, h], device=device, dtype=torch.float32)
            rois = torch.cat([owner[:, None].float(), boxes * scale], dim=1)  # [K, 5] latent pixels
            pooled = roi_align(
                source.float(),
                rois.to(source.device),
                output_size=self.pool_size,
                sampling_ratio=2,
                aligned=True,
            ).flatten(1)  # [K, C·s²]
        else:
            pooled = coords.new_zeros(k, self.latent_channels * self.pool_size**2)
        tok = self.proj(torch.cat([pooled.to(device), coords], dim=1).to(dtype)) + self.type_embedding
        out = tok.new_zeros(batch_size, o_max, tok.shape[-1])
        mask = torch.zeros(batch_size, o_max, dtype=torch.bool, device=device)
        slot = torch.cat([torch.arange(n, device=device) for n in counts if n])
        out[owner, slot] = tok
        mask[owner, slot] = True
        return out, mask


def append_tokens(
    text: torch.Tensor, text_mask: torch.Tensor, extra: torch.Tensor, extra_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, D] + [B, O, D] → [B, L+O, D]`` with each row's valid tokens first, in order (stable).

    Valid-first keeps a sample's text RoPE positions (assigned by index) independent of its batch's padding.
    """
    seq = torch.cat([text, extra.to(text.dtype)], dim=1)
    mask = torch.cat([text_mask, extra_mask.to(text_mask.device)], dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # valid (0) before padding (1)
    seq = torch.gather(seq, 1, order[..., None].expand_as(seq))
    return seq, torch.gather(mask, 1, order)


class TimeAwareTargetInjection(nn.Module):
    """TATI gate ``g(σ) = 1 + tanh(MLP(PE(1000σ)))`` ``[B, D_txt]`` on the condition stream (module doc).

    Args:
        text_dim: ``D_txt``.
        hidden_dim: MLP width.
        freq_dim: sinusoidal timestep embedding width (diffusers' ``Timesteps``, as the transformer's own).
    """

    def __init__(self, text_dim: int, hidden_dim: int = 128, freq_dim: int = 256) -> None:
        super().__init__()
        from diffusers.models.embeddings import Timesteps

        # scale=1000 as in the transformer's own time embedding: we pass σ ∈ [0, 1].
        self.time_proj = Timesteps(
            num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000
        )
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, text_dim))
        # Zero last layer: g ≡ 1 at init (exactly the plain backbone); its gradient is not zero, so it trains.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def gate(self, sigma: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return 1.0 + torch.tanh(self.mlp(self.time_proj(sigma.reshape(-1).float()).to(dtype)))

    def forward(self, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``cond`` ``[B, L, D_txt]`` ⊙ ``g(σ)`` (``σ`` ``[B]``)."""
        return cond * self.gate(sigma)[:, None, :].to(cond.dtype)


def _grid_pe(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sinusoidal positions of an ``h × w`` grid's cell centres in ``[0, 1]``: ``[h·w, dim]``."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    nf = max(1, dim // 4)
    pe = sincos(torch.stack([yy.flatten(), xx.flatten()], dim=1), nf)  # [h·w, 4·nf]
    return F.pad(pe, (0, dim - pe.shape[1])) if pe.shape[1] < dim else pe[:, :dim]


class _CrossAttention(nn.Module):
    """One HVCA layer: target tokens ``[B, N, D]`` attend to pyramid tokens ``[B, M, D]``; zero-init output."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hvca: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)  # identity at init; gradients still reach to_out
        nn.init.zeros_(self.to_out.bias)

    def forward(
        self, x: torch.Tensor, q_pos: torch.Tensor, kv: torch.Tensor, kv_pos: torch.Tensor
    ) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.to_q(self.norm_q(x) + q_pos).view(b, n, self.num_heads, hd).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(kv) + kv_pos).chunk(2, dim=-1)
        k = k.reshape(b, -1, self.num_heads, hd).transpose(1, 2)
        v = v.reshape(b, -1, self.num_heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class HybridVisualCrossAttention(nn.Module):
    """HVCA layers hooked after every ``every``-th transformer block (module doc).

    Args:
        dim: the transformer's inner width ``D``.
        num_blocks: number of transformer blocks (layers are inserted after blocks ``every-1, 2·every-1, ...``).
        every: ``k``.
        scales: pooling factors of the pyramid (×1, ×2, ×4).
        num_heads: attention heads.

    Usage (by :class:`~rededit.models.backbone.EditBackbone`): :meth:`attach` once; per forward,
    :meth:`context` builds this call's pyramid, which travels to the blocks inside the transformer's
    ``attention_kwargs`` under :data:`HVCA_KEY`. A pre-hook on every block takes it out (the attention
    processors never see it) and the forward hook of a hooked block uses it. Because the context is an
    argument of the block call, recomputing a block in backward (gradient checkpointing, diffusers' own or
    a ``checkpoint_wrapper``) sees the same context; nothing is stored on the module between calls.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        every: int = 2,
        scales: Sequence[int] = (1, 2, 4),
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"hvca.every must be >= 1, got {every}")
        self.every = int(every)
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"hvca.scales must be positive pooling factors, got {scales}")
        self.block_ids = list(range(self.every - 1, num_blocks, self.every))
        if not self.block_ids:
            raise ValueError(f"hvca.every={every} inserts no layer in a {num_blocks}-block transformer")
        self.layers = nn.ModuleList(_CrossAttention(dim, num_heads) for _ in self.block_ids)
        self.scale_embedding = nn.Parameter(torch.zeros(len(self.scales), dim))
        nn.init.normal_(self.scale_embedding, std=0.02)

    def attach(self, blocks: nn.ModuleList) -> None:
        """Hook the layers onto ``blocks``. The hooks are module-level functions that find this module through
        a plain list on the block (not a submodule: state dicts are unchanged), so a ``deepcopy`` of the
        backbone (DPO/NFT reference copies) hooks its own copy of HVCA, not the original."""
        hooked = dict(zip(self.block_ids, range(len(self.block_ids))))
        for block_idx, block in enumerate(blocks):
            block.register_forward_pre_hook(_hvca_pre_hook, with_kwargs=True)
            if block_idx in hooked:
                block._rededit_hvca = [self, hooked[block_idx]]
                block.register_forward_hook(_hvca_hook)

    def apply_layer(self, layer_idx: int, ctx: dict | None, output: tuple) -> tuple | None:
        if ctx is None:  # T2I (no Picture 1) or a transformer call made outside EditBackbone.forward
            return None
        enc, hidden = output
        n = ctx["n_target"]
        tgt = hidden[:, :n]
        delta = self.layers[layer_idx](tgt, ctx["q_pos"].to(tgt.dtype), ctx["kv"], ctx["kv_pos"])
        return enc, torch.cat([tgt + delta.to(tgt.dtype), hidden[:, n:]], dim=1)

    def pyramid(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded source tokens ``[B, N_1, D]`` on a ``(h, w)`` grid → pyramid ``[B, M, D]`` + positions ``[M, D]``."""
        b, _, d = tokens.shape
        h, w = grid
        fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
        feats, pos = [], []
        for i, s in enumerate(self.scales):
            size = (max(1, math.ceil(h / s)), max(1, math.ceil(w / s)))
            pooled = F.adaptive_avg_pool2d(fmap, size).flatten(2).transpose(1, 2)  # [B, h_s·w_s, D]
            feats.append(pooled + self.scale_embedding[i].to(pooled.dtype))
            pos.append(_grid_pe(*size, d, tokens.device))
        kv_pos = torch.cat(pos).to(tokens.dtype)
        return torch.cat(feats, dim=1), kv_pos

    def context(
        self, img_in: nn.Module, source: torch.Tensor, target_hw: tuple[int, int], patch: int
    ) -> dict:
        """This forward's context from Picture 1's latent ``[B, C, h_1, w_1]`` and the target latent size."""
        dtype = img_in.weight.dtype
        src = img_in(pack_latents(source, patch).to(dtype))  # [B, N_1, D], the transformer's own embedding
        kv, kv_pos = self.pyramid(src, (source.shape[-2] // patch, source.shape[-1] // patch))
        th, tw = target_hw[0] // patch, target_hw[1] // patch
        return {
            "n_target": th * tw,
            "q_pos": _grid_pe(th, tw, src.shape[-1], src.device),
            "kv": kv,
            "kv_pos": kv_pos,
        }


HVCA_KEY = "rededit_hvca"
_JOINT_KWARGS_POS = (
    5  # QwenImageTransformerBlock.forward's joint_attention_kwargs (positional under checkpointing)
)


def _hvca_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Take the HVCA context out of the block's ``joint_attention_kwargs`` (keyword, or positional when
    diffusers' checkpointing calls the block) and keep it for this call's forward hook."""
    ctx = None
    if (
        isinstance(kwargs.get("joint_attention_kwargs"), dict)
        and HVCA_KEY in kwargs["joint_attention_kwargs"]
    ):
        joint = dict(kwargs["joint_attention_kwargs"])
        ctx = joint.pop(HVCA_KEY)
        kwargs = {**kwargs, "joint_attention_kwargs": joint}
    elif (
        len(args) > _JOINT_KWARGS_POS
        and isinstance(args[_JOINT_KWARGS_POS], dict)
        and HVCA_KEY in args[_JOINT_KWARGS_POS]
    ):
        joint = dict(args[_JOINT_KWARGS_POS])
        ctx = joint.pop(HVCA_KEY)
        args = (*args[:_JOINT_KWARGS_POS], joint, *args[_JOINT_KWARGS_POS + 1 :])
    module._rededit_hvca_ctx = ctx  # read (and dropped) by _hvca_hook right after this block call
    return args, kwargs


def _hvca_hook(module: nn.Module, args: tuple, output: tuple) -> tuple | None:
    """Forward hook of a hooked transformer block: ``(text, image)`` → image target tokens + HVCA update."""
    hvca, layer_idx = module._rededit_hvca
    ctx, module._rededit_hvca_ctx = getattr(module, "_rededit_hvca_ctx", None), None
    return hvca.apply_layer(layer_idx, ctx, output)
