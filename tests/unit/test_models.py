"""Local checkpoints: written by save_checkpoint, read back through load_model(ModelSpec(arch, pretrained=path))."""

import copy

import pytest
import torch

from cliptuner.config import ModelSpec
from cliptuner.train.models import load_model, read_checkpoint, save_checkpoint


def test_checkpoint_round_trip_gives_identical_embeddings(tiny_bundle, tmp_path):
    model = copy.deepcopy(tiny_bundle.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # "fine-tuned" weights, different from any random init
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    path = save_checkpoint(tmp_path / "ckpt" / "tuned.pt", model, tiny_bundle.spec, epoch=3)
    assert read_checkpoint(path)["epoch"] == 3

    reloaded = load_model(ModelSpec("cliptuner-tiny", pretrained=str(path)))
    fresh = load_model(ModelSpec("cliptuner-tiny"))
    ids = tiny_bundle.tokenizer(["a photo of a cat", "", "a very long caption " * 20])
    pixels = torch.randn(3, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected_txt = model.encode_text(ids, normalize=True)
        expected_img = model.encode_image(pixels, normalize=True)
        assert torch.equal(reloaded.model.encode_text(ids, normalize=True), expected_txt)
        assert torch.equal(reloaded.model.encode_image(pixels, normalize=True), expected_img)
        assert not torch.allclose(fresh.model.encode_text(ids, normalize=True), expected_txt)  # loading mattered
    assert not reloaded.model.training


def test_checkpoint_of_another_arch_is_refused(tiny_bundle, tmp_path):
    path = save_checkpoint(tmp_path / "tiny.pt", tiny_bundle.model, tiny_bundle.spec)
    with pytest.raises(ValueError, match="holds arch 'cliptuner-tiny', not 'cliptuner-small'"):
        load_model(ModelSpec("cliptuner-small", pretrained=str(path)))
