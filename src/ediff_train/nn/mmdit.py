"""MMDiT backbone: diffusers' maintained `SD3Transformer2DModel` behind our preconditioning.

F(x, c_noise, cond) = SD3Transformer(x, encoder_hidden_states=[CLIP text, T5] tokens,
pooled_projections=[pooled CLIP, CLIP image], timestep=timestep_scale·c_noise). With
param=flow, c_noise is t ∈ [0, 1] and the default scale 1000 gives the flow scheduler's
timestep (what a pretrained SD3 saw), and D = x_t − t·v is SD3's own x₀ estimate, so a
pretrained SD3 transformer drops in (docs/backbones.md).

Joint attention has no key mask: every context token is a key and a query. Padded T5 positions
are zeroed before packing and `t5_tokens` fixes their count (SD3 pads to 256 likewise), so a
sample's output does not depend on its batch-mates' caption lengths; a dropped T5 is the same
zeros. Paint-with-words and attention recording are refused in one line.
"""

from __future__ import annotations

from torch import Tensor, nn

from ediff_train.core.conditioning import Conditioning
from ediff_train.errors import EdiffError
from ediff_train.nn.diffusers_backbone import DiffusersBackbone, diffusers_class, load_pretrained

CLASS = "SD3Transformer2DModel"
PROCESSOR = "JointAttnProcessor2_0"  # diffusers' default: torch SDPA


class MMDiT(DiffusersBackbone):
    """Arguments are plain ints (Hydra). With `pretrained` (a local diffusers folder; its
    `subfolder`, default "transformer", or the folder itself) the architecture comes from the
    folder and the ints describing it are ignored; channels, image size and the encoder widths
    are checked against it."""

    kind = "mmdit"

    def __init__(
        self,
        image_size: int,
        t5_dim: int,
        clip_txt_dim: int,
        clip_pool_dim: int,
        clip_img_dim: int,
        patch_size: int = 2,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 24,
        joint_attention_dim: int | None = None,
        pooled_projection_dim: int | None = None,
        pos_embed_max_size: int | None = None,
        qk_norm: str | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        t5_tokens: int | None = 16,
        clip_tokens: int | None = None,
        context_proj: str = "pad",
        timestep_scale: float = 1000.0,
        grad_checkpointing: bool = False,
        pretrained: str | None = None,
        subfolder: str | None = "transformer",
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
            pooled = pooled_projection_dim or clip_pool_dim + clip_img_dim
            joint = joint_attention_dim or max(t5_dim, clip_txt_dim)
            if self.image_size % int(patch_size):
                raise EdiffError(f"image_size {image_size} is not divisible by patch {patch_size}")
            self.model = _fresh(
                sample_size=self.image_size,
                patch_size=int(patch_size),
                in_channels=self.in_channels,
                out_channels=self.out_channels,
                num_layers=int(num_layers),
                num_attention_heads=int(num_attention_heads),
                attention_head_dim=int(attention_head_dim),
                joint_attention_dim=int(joint),
                caption_projection_dim=int(num_attention_heads) * int(attention_head_dim),
                pooled_projection_dim=int(pooled),
                pos_embed_max_size=int(pos_embed_max_size or self.image_size // int(patch_size)),
                qk_norm=qk_norm,
            )
        cfg = self.model.config
        where = f"pretrained {pretrained!r}" if pretrained else "model"
        self._check_fit(cfg, where)
        self.setup_packing(
            dims,
            cfg.joint_attention_dim,
            cfg.pooled_projection_dim,
            context_proj,
            t5_tokens,
            clip_tokens,
            where,
            ("joint_attention_dim", "pooled_projection_dim"),
        )
        procs = {type(p).__name__ for p in self.model.attn_processors.values()}
        if procs != {PROCESSOR}:
            raise EdiffError(f"{where} uses attention processors {sorted(procs)}, not {PROCESSOR}")
        self.grad_checkpointing = bool(grad_checkpointing)

    def _check_fit(self, cfg: object, where: str) -> None:
        """One line when the folder's model cannot take our images."""
        for key, ours in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            theirs = getattr(cfg, key)
            if theirs is not None and int(theirs) != ours:
                raise EdiffError(f"{where} has {key}={theirs}, the data needs {ours}")
        p, size = int(cfg.patch_size), self.image_size
        if cfg.pos_embed_max_size is None:  # positions learned for sample_size alone
            if size != int(cfg.sample_size):
                raise EdiffError(
                    f"{where} takes {cfg.sample_size} px images only, the data is {size} px"
                )
        elif size % p or size // p > int(cfg.pos_embed_max_size):
            top = int(cfg.pos_embed_max_size) * p
            raise EdiffError(
                f"{where} takes images up to {top} px in multiples of patch_size {p}, "
                f"the data is {size} px"
            )

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Conditioning, cross_attn_bias: object = None
    ) -> Tensor:
        """x [B,C,H,W], c_noise [B] → F [B,out_channels,H,W]."""
        self.refuse_hook(cross_attn_bias)
        self.check_input(x, cond)
        dtype = self.model.proj_out.weight.dtype
        tokens, _ = self.context(cond, dtype)  # no key mask in joint attention (module doc)
        return self.model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=tokens,
            pooled_projections=self.pooled(cond, dtype),
            timestep=self.timestep(c_noise, x.shape[0]),
            return_dict=False,
        )[0]


def _fresh(**config: object) -> nn.Module:
    """A new random SD3 transformer with a zero output layer, so D = c_skip·x at the start as
    for the other backbones (DiT's zero-init)."""
    model = diffusers_class(CLASS)(**config)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model
