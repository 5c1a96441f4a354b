import timm
import torch

from dat_ds.config import ModelConfig
from dat_ds.models import build_model, input_layer_name, to_low_precision


def test_registered_architectures_create_through_timm():
    for name, params in [("preact_resnet18", 11.17e6), ("wrn28_10", 36.48e6), ("dat_digits_cnn", 94186),
                         ("preact_resnet18_w16", 0.70e6), ("dat_preact_resnet18", 11.17e6)]:  # fmt: skip
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


def _delta_seen_error(model, x, delta, cast_pixels: bool) -> float:
    """Mean relative error of the perturbation as the input layer receives it (in pixel units)."""
    seen = []
    layer = model.net.get_submodule(input_layer_name(model.net))
    h = layer.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].double()))
    dtype = torch.bfloat16
    with torch.no_grad():
        for xi in (x, x + delta):
            model(xi.to(dtype) if cast_pixels else xi)
    h.remove()
    got = (seen[1] - seen[0]) * model.std.double()
    return ((got - delta.double()).abs().mean() / delta.double().abs().mean()).item()


def test_bf16_model_sees_the_attack_delta_intact():
    """Pixels, delta and normalization stay fp32 up to the input layer under bf16 (ImageNet statistics,
    eps = 2/255): the perturbation arrives within 1 %. Casting the pixels first (the old way) moves it by tens of %."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="resnet18"), 10, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    to_low_precision(m.eval(), torch.bfloat16)
    assert m.net.conv1.weight.dtype == torch.float32 and m.net.fc.weight.dtype == torch.bfloat16
    assert m.net.bn1.weight.dtype == torch.float32 and m.net.bn1.running_mean.dtype == torch.float32
    x = torch.rand(4, 3, 32, 32)
    delta = torch.empty_like(x).uniform_(-2 / 255, 2 / 255)  # PGD's random start; later steps move within it
    delta = (x + delta).clamp(0, 1) - x
    assert _delta_seen_error(m, x, delta, cast_pixels=False) < 0.01
    assert _delta_seen_error(m, x, delta, cast_pixels=True) > 0.05, "the check can see a bf16 cast"
    out = m(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 10)


def test_pretrained_models_normalize_with_their_own_statistics():
    """model.input_norm = "auto": a pretrained timm network gets its pretrained_cfg's mean/std (what its weights
    were trained with), a network from scratch the shard set's; the recipe can say otherwise."""
    import pytest

    from dat_ds.models import input_stats

    data = ([0.5] * 3, [0.2] * 3)
    pre = ModelConfig(name="resnet50", pretrained=True)
    assert pre.norm == "model"
    m, s = input_stats(pre, 3, *data)
    assert m == pytest.approx((0.485, 0.456, 0.406)) and s == pytest.approx((0.229, 0.224, 0.225))
    assert input_stats(ModelConfig(name="resnet50", pretrained=True, input_norm="data"), 3, *data) == (
        (0.5,) * 3,
        (0.2,) * 3,
    )
    assert ModelConfig(name="resnet50").norm == "data"
    assert input_stats(ModelConfig(name="resnet50"), 3, *data) == ((0.5,) * 3, (0.2,) * 3)
