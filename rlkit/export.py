"""Export a trained policy so diffusers loads it: ``StableDiffusion3Pipeline.load_lora_weights(folder)``."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from rlkit.runtime.checkpoint import write_folder_atomic


def export_policy_lora(transformer: torch.nn.Module, adapter_name: str, out_dir: str | Path,
                       recipe_file: str | Path | None = None,
                       weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Writes ``pytorch_lora_weights.safetensors`` (diffusers' SD3 LoRA format) and the resolved recipe.

    ``weights`` (parameter name -> value) stand in for the module's values of those parameters: the trainers pass
    float32 ones (the EMA's average, or DeepSpeed's fp32 masters) where a bf16 run's module holds rounded copies."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    source = None if weights is None else {**transformer.state_dict(), **weights}
    state = get_peft_model_state_dict(transformer, state_dict=source, adapter_name=adapter_name)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config = transformer.peft_config[adapter_name]

    def write(folder: Path) -> None:
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=config.to_dict())
        if recipe_file is not None and Path(recipe_file).is_file():
            shutil.copy(recipe_file, folder / "recipe.yaml")

    return write_folder_atomic(out_dir, write)


def export_full_transformer(transformer: torch.nn.Module, out_dir: str | Path,
                            recipe_file: str | Path | None = None) -> Path:
    """Full fine-tuning: the transformer folder (``SD3Transformer2DModel.from_pretrained``) and the recipe.

    The weights are written in the dtype the module runs in, as DeepSpeed's 16-bit save and accelerate's
    ``get_state_dict`` do: a bf16 DeepSpeed run writes bf16 (half an fp32 file's size, the precision SD3.5 is
    loaded in), where a LoRA export, small beside it, keeps the float32 values (:func:`export_policy_lora`)."""
    out_dir = Path(out_dir)
    transformer.save_pretrained(out_dir / "transformer")
    if recipe_file is not None and Path(recipe_file).is_file():
        shutil.copy(recipe_file, out_dir / "recipe.yaml")
    return out_dir
