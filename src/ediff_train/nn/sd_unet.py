"""SD-class U-Net backbone: diffusers' `UNet2DConditionModel` behind our preconditioning.

F(x, c_noise, cond) = UNet(x, timestep=timestep_scale·c_noise, encoder_hidden_states=[CLIP
text, T5] tokens, encoder_attention_mask=their key mask, class_labels=[pooled CLIP, CLIP
image]). The pooled vector goes through `class_embed_type="projection"` (a timestep-style MLP
added to the time embedding); a pretrained SD 1.x/2.x U-Net has no such slot and then ignores
it. VP's c_noise is already the 1000-step DDPM index, so `param=vp_eps|vp_v` with the default
scale 1 is what an SD U-Net was trained on (c_in·x_σ = α·x₀ + s·ε is its x_t). Unlike the
MMDiT, cross-attention takes a key mask, so padded T5 tokens do not reach the output.

Paint-with-words and attention recording are refused in one line (docs/backbones.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.diffusers_backbone import DiffusersBackbone, diffusers_class, load_pretrained

CLASS = "UNet2DConditionModel"
PROCESSOR = "AttnProcessor2_0"  # diffusers' default: torch SDPA


class SDUNet(DiffusersBackbone):
    """Arguments are plain ints/lists (Hydra). `heads` is the number of attention heads
    (diffusers' UNet2DConditionModel calls it `attention_head_dim`, a historical misnomer).
    With `pretrained` (a local diffusers folder; its `subfolder`, default "unet", or the folder
    itself) the architecture comes from the folder; channels, image size and the encoder widths
    are checked against it."""

    kind = "sd_unet"

    def __init__(
        self,
        image_size: int,
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        block_out_channels: Sequence[int] = (32, 64),
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block: int = 1,
        heads: int = 4,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 8,
        in_channels: int = 3,
        out_channels: int = 3,
        t5_tokens: int | None = None,
        clip_tokens: int | None = None,
        context_proj: str = "pad",
        timestep_scale: float = 1.0,
        grad_checkpointing: bool = False,
        pretrained: str | None = None,
        subfolder: str | None = "unet",
    ) -> None:
        super().__init__()
        dims = {"t5": t5_dim, "clip_txt": clip_txt_dim, "clip_pool": clip_pool_dim}
        dims["clip_img"] = clip_img_dim
        self.image_size = int(image_size)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.timestep_scale = float(timestep_scale)
        if pretrained:
            self.model = load_pretrained(CLASS, pretrained, subfolder)
        else:
            if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(
                block_out_channels
            ):
                raise EdiffError(
                    f"block_out_channels {list(block_out_channels)} needs as many down and up "
                    f"block types, got {len(down_block_types)} and {len(up_block_types)}"
                )
            self.model = diffusers_class(CLASS)(
                sample_size=self.image_size,
                in_channels=self.in_channels,
                out_channels=self.out_channels,
                block_out_channels=tuple(int(c) for c in block_out_channels),
                down_block_types=tuple(str(t) for t in down_block_types),
                up_block_types=tuple(str(t) for t in up_block_types),
                layers_per_block=int(layers_per_block),
                attention_head_dim=int(heads),
                cross_attention_dim=int(cross_attention_dim or max(t5_dim, clip_txt_dim)),
                norm_num_groups=int(norm_num_groups),
                class_embed_type="projection",
                projection_class_embeddings_input_dim=int(clip_pool_dim + clip_img_dim),
            )
            nn.init.zeros_(self.model.conv_out.weight)  # D = c_skip·x at the start
            nn.init.zeros_(self.model.conv_out.bias)
        cfg = self.model.config
        where = f"pretrained {pretrained!r}" if pretrained else "model"
        self._check_fit(cfg, where)
        pooled = cfg.projection_class_embeddings_input_dim if cfg.class_embed_type else None
        self.uses_pooled = pooled is not None
        self.setup_packing(
            dims,
            cfg.cross_attention_dim,
            pooled,
            context_proj,
            t5_tokens,
            clip_tokens,
            where,
            ("cross_attention_dim", "projection_class_embeddings_input_dim"),
        )
        procs = {type(p).__name__ for p in self.model.attn_processors.values()}
        if procs != {PROCESSOR}:
            raise EdiffError(f"{where} uses attention processors {sorted(procs)}, not {PROCESSOR}")
        self.grad_checkpointing = bool(grad_checkpointing)

    def _check_fit(self, cfg: object, where: str) -> None:
        """One line when the folder's U-Net cannot take our images or our pooled vector."""
        for key, ours in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if int(getattr(cfg, key)) != ours:
                raise EdiffError(f"{where} has {key}={getattr(cfg, key)}, the data needs {ours}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if self.image_size % factor:
            raise EdiffError(
                f"{where} down-samples {len(cfg.block_out_channels) - 1} times: the image size "
                f"must be a multiple of {factor}, the data is {self.image_size} px"
            )
        if not isinstance(cfg.cross_attention_dim, int):
            raise EdiffError(f"{where} has per-block cross_attention_dim; one width is supported")
        if cfg.addition_embed_type is not None:
            raise EdiffError(
                f"{where} has addition_embed_type={cfg.addition_embed_type!r} (SDXL-style); "
                "only class_embed_type projection or none is supported"
            )
        if cfg.class_embed_type not in (None, "projection"):
            raise EdiffError(
                f"{where} has class_embed_type={cfg.class_embed_type!r}; "
                "supported: projection (our pooled vector) or none"
            )

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Conditioning, cross_attn_bias: object = None
    ) -> Tensor:
        """x [B,C,H,W], c_noise [B] → F [B,out_channels,H,W]."""
        self.refuse_hook(cross_attn_bias)
        self.check_input(x, cond)
        dtype = self.model.conv_in.weight.dtype
        tokens, mask = self.context(cond, dtype)
        return self.model(
            x.to(dtype),
            self.timestep(c_noise, x.shape[0]),
            encoder_hidden_states=tokens,
            encoder_attention_mask=mask,
            class_labels=self.pooled(cond, dtype) if self.uses_pooled else None,
            return_dict=False,
        )[0]
