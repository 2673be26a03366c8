"""Models: shapes, parameter counts, the norm and skip switches, and the build_model registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseopt.models import MODEL_NAMES, BasicBlock, CifarResNet, build_model, mlp_bn_mnist

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def has(model: nn.Module, kind: type[nn.Module]) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "in_shape", "num_classes"),
    [
        ("mlp", (1, 28, 28), 10),
        ("mlp_bn_mnist", (1, 28, 28), 10),
        ("cnn", (1, 28, 28), 10),
        ("resnet20", (3, 32, 32), 100),
        ("resnet32", (3, 32, 32), 10),
        ("resnet56", (3, 32, 32), 10),
        ("resnet50", (3, 64, 64), 7),
    ],
)
def test_every_registered_model_maps_inputs_to_logits(name, in_shape, num_classes):
    model = build_model(name, num_classes, in_shape)
    out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registry_covers_the_documented_names():
    assert set(MODEL_NAMES) == {"mlp", "mlp_bn_mnist", "cnn", "resnet20", "resnet32", "resnet56", "resnet50"}


def test_parameter_counts():
    assert n_params(build_model("resnet50", 1000, (3, 224, 224))) == 25_557_032  # torchvision resnet50
    # Option-A ResNet-20 has 269,722 parameters; option-B projections add 2 x (1x1 conv + BN).
    assert n_params(build_model("resnet20", 10, (3, 32, 32))) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    assert n_params(build_model("resnet20", 10, (3, 32, 32), skip_connections=False)) == 269_722
    assert n_params(mlp_bn_mnist()) == (784 * 64 + 64) + 2 * 64 + (64 * 10 + 10)
    assert 50_000 <= n_params(build_model("cnn", 10, (1, 28, 28))) <= 100_000
    assert n_params(build_model("mlp", 10, (1, 28, 28))) == (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)


def test_resnet50_matches_torchvision_layout():
    state = build_model("resnet50", 1000, (3, 224, 224)).state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3 conv
    assert state["layer4.2.bn3.weight"].shape == (2048,)
    assert state["fc.weight"].shape == (1000, 2048)
    assert sum(k.endswith("conv3.weight") for k in state) == 16


def test_resnet50_zero_init_residual_zeroes_last_bn_gamma():
    model = build_model("resnet50", 10, (3, 64, 64), zero_init_residual=True)
    gammas = [m.bn3.weight for m in model.modules() if hasattr(m, "bn3")]
    assert len(gammas) == 16 and all(torch.count_nonzero(g) == 0 for g in gammas)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 64


def test_resnet_convs_have_no_bias_and_width_scales_channels():
    model = build_model("resnet20", 10, (1, 28, 28), width=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert model.conv1.in_channels == 1 and model.fc.in_features == 128
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _zero_residual_branches(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
            nn.init.zeros_(m.bn2.bias)


def test_basic_block_skip_switch():
    x = torch.randn(4, 16, 8, 8)
    with_skip, without = BasicBlock(16, 16, skip=True).eval(), BasicBlock(16, 16, skip=False).eval()
    without.load_state_dict(with_skip.state_dict())
    _zero_residual_branches(with_skip)
    _zero_residual_branches(without)
    assert torch.allclose(with_skip(x), torch.relu(x))  # only the identity path remains
    assert torch.count_nonzero(without(x)) == 0  # nothing bypasses the zeroed branch


def test_resnet_without_skips_has_no_path_around_blocks():
    torch.manual_seed(0)
    skip = CifarResNet(3, skip_connections=True).eval()
    plain = CifarResNet(3, skip_connections=False).eval()
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".shortcut." in k for k in missing)
    assert not any(".shortcut" in name for name, _ in plain.named_modules())

    x = torch.randn(3, 3, 32, 32)
    assert not torch.allclose(skip(x), plain(x))
    # With every residual branch silenced, only skip connections can carry the input to the classifier.
    _zero_residual_branches(skip)
    _zero_residual_branches(plain)
    out_skip, out_plain = skip(x), plain(x)
    assert not torch.allclose(out_skip[0], out_skip[1])
    assert torch.allclose(out_plain, plain.fc.bias.expand(3, -1))


def test_norm_switches():
    assert has(mlp_bn_mnist(), nn.BatchNorm1d) and not has(mlp_bn_mnist(norm="none"), nn.BatchNorm1d)
    assert has(build_model("mlp", 10, (784,), hidden=[32], norm="layer"), nn.LayerNorm)
    cnn_plain = build_model("cnn", 10, (1, 28, 28), norm="none")
    assert not has(cnn_plain, nn.BatchNorm2d)
    assert all(m.bias is not None for m in cnn_plain.modules() if isinstance(m, nn.Conv2d))
    assert has(build_model("cnn", 10, (3, 32, 32)), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm"):
        build_model("cnn", 10, (1, 28, 28), norm="layer")
    with pytest.raises(ValueError, match="norm"):
        mlp_bn_mnist(norm="group")  # type: ignore[arg-type]


FACTORY_MODULE = '''
from torch import nn

def full(num_classes, in_shape, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))

def kwargs_only(width):
    return nn.Linear(width, width)

class Zoo:
    @staticmethod
    def tiny(**kwargs):
        return nn.Linear(kwargs["in_shape"][0], kwargs["num_classes"])

def not_a_model(num_classes):
    return "oops"
'''


def test_module_callable_loading(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_test.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("user_models_for_test:full", 5, (1, 4, 4), hidden=3)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 5) and model[1].out_features == 3
    assert build_model("user_models_for_test:kwargs_only", 5, (1, 4, 4), width=6).in_features == 6
    assert build_model("user_models_for_test:Zoo.tiny", 4, (9,)).out_features == 4
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_model("user_models_for_test:not_a_model", 5, (1,))
    with pytest.raises(ValueError, match="no attribute"):
        build_model("user_models_for_test:missing", 5, (1,))
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_package_xyz.models:net", 5, (1,))


def test_unknown_model_lists_names_and_suggests_closest():
    with pytest.raises(ValueError) as info:
        build_model("resnet-20", 10, (3, 32, 32))
    message = str(info.value)
    assert "Did you mean 'resnet20'" in message and all(name in message for name in MODEL_NAMES)
