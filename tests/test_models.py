import timm
import torch

from dat_ds.config import ModelConfig
from dat_ds.models import build_model


def test_registered_architectures_create_through_timm():
    for name, params in [("preact_resnet18", 11.17e6), ("wrn28_10", 36.48e6), ("dat_digits_cnn", 94186)]:
        m = timm.create_model(name, num_classes=10)
        n = sum(p.numel() for p in m.parameters())
        assert abs(n - params) / params < 0.02, (name, n)
    x = torch.rand(2, 3, 32, 32)
    assert timm.create_model("preact_resnet18", num_classes=100)(x).shape == (2, 100)


def test_normalization_is_the_first_layer():
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="dat_digits_cnn"), 10, 1, [0.5], [0.25]).eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(m(x), m.net((x - 0.5) / 0.25))
    assert "mean" not in m.state_dict() and "net.fc.weight" in m.state_dict()


def test_any_timm_model_by_name():
    m = build_model(ModelConfig(name="resnet18"), 10, 3, [0.5] * 3, [0.25] * 3)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
