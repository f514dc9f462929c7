"""A tiny model folder with a Pixtral / Mistral Small 3.1 style vision tower next to its text decoder."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Names that a careless filter would take for the decoder's (`...layers.0.attention.wq.weight`), and shapes that
# fit no parameter of it.
VISION_TOWER = {
    "native": {
        "vision_encoder.patch_conv.weight": (24, 3, 4, 4),
        "vision_encoder.transformer.layers.0.attention.wq.weight": (24, 24),
        "vision_language_adapter.w_in.weight": (64, 24),
        "pre_mm_projector_norm.weight": (24,),
    },
    "hf": {
        "vision_tower.patch_conv.weight": (24, 3, 4, 4),
        "vision_tower.transformer.layers.0.attention.q_proj.weight": (24, 24),
        "multi_modal_projector.linear_1.weight": (64, 24),
    },
}


def add_vision_tower(source: Path, folder: Path, layout: str) -> Path:
    """Copy a native or HF model folder into `folder`, adding the tower's tensors to its weights file (and,
    natively, a `vision_encoder` entry to params.json, as Pixtral's has)."""
    for file in source.iterdir():
        shutil.copy(file, folder / file.name)
    weights = folder / ("model.safetensors" if layout == "hf" else "consolidated.safetensors")
    state = load_file(weights)
    generator = torch.Generator().manual_seed(1)
    state.update({name: torch.randn(shape, generator=generator) for name, shape in VISION_TOWER[layout].items()})
    save_file(state, weights, {"format": "pt"})
    if layout == "native":
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps(dict(params, vision_encoder={"hidden_size": 24})))
    return folder
