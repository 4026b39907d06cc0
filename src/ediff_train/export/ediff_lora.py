"""LoRA experts on one base, in the exported pipeline (copied as `ediff_lora.py` beside
`pipeline.py`: torch and diffusers only, no ediff_train import).

`ediff-export … lora=true` writes each LoRA expert as a diffusers LoRA file (`lora/<node>/
pytorch_lora_weights.safetensors`, PEFT keys under `transformer.` or `unet.`) and `lora/lora.json`
(the base node, each expert's σ band and guidance). Why one base with named adapters rather than
Wan2.2's pair (`load_into_transformer_2`): every LoRA expert of a tree adapts the same base, so
the experts are one model plus one adapter each, and the pipeline switches the adapter by σ, as
ediff-sample does. `load_lora_weights` is diffusers' loader (`load_lora_adapter` of the model);
`load_lora_experts` loads a whole lora/ folder onto the base's export and routes by σ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers.loaders.lora_base import LoraBaseMixin

LORA_JSON = "lora.json"
LORA_FORMAT = "ediff-export-lora/1"


class LoraMixin(LoraBaseMixin):
    """diffusers' LoRA methods (`set_adapters`, `fuse_lora`, `unload_lora_weights`, …) for the
    ensemble pipeline, whose expert models sit in numbered slots (the class lists them in
    `_lora_loadable_modules`)."""

    config: Any

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, Any],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """A diffusers LoRA file (SD3's `transformer.` or SD's `unet.` keys, PEFT format) into
        one expert model: the first (the most noise), `transformer_2`/`unet_2` with Wan's
        `load_into_transformer_2=True`, or any slot with `component=`."""
        component = kwargs.pop("component", None)
        if component is None:
            first = str(self.config.experts[0]["component"])
            kind = "unet" if first.startswith("unet") else "transformer"
            two = kwargs.pop("load_into_transformer_2", False)
            component = f"{kind}_2" if two else kind
        model = getattr(self, component, None)
        if model is None:
            raise ValueError(f"this pipeline has no {component} to load a LoRA into")
        if not hasattr(model, "load_lora_adapter"):
            raise ValueError(
                f"{component} is a {type(model).__name__}, which diffusers does not load LoRA "
                "into (SD3Transformer2DModel and UNet2DConditionModel do): use the merged export"
            )
        prefix = "unet" if component.startswith("unet") else "transformer"
        kwargs.setdefault("use_safetensors", True)  # as the pipelines' loaders: a folder works
        model.load_lora_adapter(
            pretrained_model_name_or_path_or_dict,
            prefix=prefix,
            adapter_name=adapter_name,
            hotswap=hotswap,
            _pipeline=self,
            **kwargs,
        )

    def load_lora_experts(self, folder: str | os.PathLike, **kwargs: Any) -> None:
        """Every expert of an export's `lora/` folder as a named adapter on this pipeline's one
        model (the export of their base node), each routed to its σ band with its guidance."""
        folder = Path(folder)
        rec = json.loads((folder / LORA_JSON).read_text())
        if rec.get("format") != LORA_FORMAT:
            raise ValueError(f"{folder / LORA_JSON} is not {LORA_FORMAT} (got {rec.get('format')})")
        base, experts = rec["base"]["node"], self.config.experts
        if len(experts) != 1 or experts[0]["node"] != base:
            have = [e["node"] for e in experts]
            raise ValueError(
                f"the LoRA experts of {folder} adapt {base}: load them onto the export of {base} "
                f"alone (ediff-export run_dir=… experts={base}), not onto a pipeline of {have}"
            )
        component = str(experts[0]["component"])
        for e in rec["experts"]:
            where = folder / e["file"]
            self.load_lora_weights(
                str(where.parent),
                weight_name=where.name,
                adapter_name=e["node"],
                component=component,
                **kwargs,
            )
        keys = ("node", "sigma", "guidance_scale")
        routed = [
            {**{k: e[k] for k in keys}, "component": component, "adapter": e["node"]}
            for e in rec["experts"]
        ]
        self.register_to_config(experts=routed, boundary_ratio=rec.get("boundary_ratio"))

    def activate(self, model: Any, expert: dict[str, Any]) -> None:
        """Make the expert's adapter the only active one of its model (when it names one)."""
        name = expert.get("adapter")
        if name is not None and model.active_adapters() != [name]:
            model.set_adapters(name)
