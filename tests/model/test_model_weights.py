"""model/weights.py, the one reader of weights: every layout in native names, a vision tower left out (or kept on
request), and header-only specs that match what is read."""

import pytest
import torch
from multimodal import VISION_TOWER

from model.weights import read_weights, vision_tower_specs, weight_specs


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_a_vision_tower_is_left_out_and_the_decoder_reads_as_without_it(layout, tiny_folder, multimodal_folder):
    plain = list(read_weights(tiny_folder("mistral-7b", layout)))
    multimodal = list(read_weights(multimodal_folder(layout)))
    assert [name for name, _ in multimodal] == [name for name, _ in plain]
    for (name, a), (_, b) in zip(multimodal, plain):
        assert torch.equal(a, b), name
    assert sorted(vision_tower_specs(multimodal_folder(layout))) == sorted(VISION_TOWER[layout])
    assert vision_tower_specs(tiny_folder("mistral-7b", layout)) == {}


def test_a_kept_vision_tower_comes_under_its_stored_names(multimodal_folder):
    tensors = dict(read_weights(multimodal_folder("native"), vision_tower=True))
    for name, shape in VISION_TOWER["native"].items():
        assert tuple(tensors[name].shape) == shape
    assert "layers.0.attention.wq.weight" in tensors and tensors["layers.0.attention.wq.weight"].shape == (64, 64)


@pytest.mark.parametrize("layout", ["native", "hf", "pth", "sharded", "multimodal"])
@pytest.mark.parametrize("vision_tower", [False, True])
def test_specs_from_headers_match_what_is_read(layout, vision_tower, tiny_folder, multimodal_folder):
    folder = multimodal_folder() if layout == "multimodal" else tiny_folder("mixtral-8x7b", layout)
    read = [(name, t.dtype, tuple(t.shape)) for name, t in read_weights(folder, vision_tower=vision_tower)]
    specs = weight_specs(folder, vision_tower=vision_tower)
    assert read == [(name, spec.dtype, spec.shape) for name, spec in specs.items()]
    assert len(read) > 20


def test_hf_names_come_out_native(tiny_folder):
    native = dict(read_weights(tiny_folder("mixtral-8x7b", "native")))
    from_hf = dict(read_weights(tiny_folder("mixtral-8x7b", "hf")))
    assert sorted(from_hf) == sorted(native)
    for name, tensor in native.items():
        torch.testing.assert_close(from_hf[name], tensor, rtol=0, atol=0, msg=name)
