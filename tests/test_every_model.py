"""Every registered model, as timm and segmentation_models_pytorch test theirs: forward on odd
sizes where the model allows them, backward, the recorded config rebuilding the same
architecture, a save/load round trip through safetensors, and an ONNX export."""

import numpy as np
import pytest
import torch

from tiramisu import list_models
from tiramisu.models import FCDenseNet, build_architecture, create_model, model_config
from tiramisu.pretrained import load_pretrained, save_pretrained

MODELS = list_models()


def small(name):
    torch.manual_seed(0)
    # The registered depth and block structure (every code path), with few classes and, for the
    # wide models, a growth rate of 4 so that the suite stays fast on 2 CPU cores.
    model = create_model(name, num_classes=3)
    if sum(p.numel() for p in model.parameters()) > 1_500_000:
        model = create_model(name, num_classes=3, growth_rate=4)
    return model


def input_size(model):
    if isinstance(model, FCDenseNet):
        return (37, 45)  # odd, not a multiple of 32: the centre crops must handle it
    return (32, 32) if model.config["stem"] == "cifar" else (64, 64)


def pretrained_config(model):
    n = model.num_classes
    return {
        "library": "tiramisu",
        "format_version": 1,
        "task": "segmentation" if isinstance(model, FCDenseNet) else "classification",
        "architecture": type(model).__name__,
        "model_config": model_config(model),
        "classes": [f"c{i}" for i in range(n)],
        "colors": [[10 * i, 0, 0] for i in range(n)],
        "ignore_index": 255,
        "bn_eval": "running",
        "preprocessing": {"mean": None, "std": None, "channels": model.in_channels},
    }


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_config_round_trip(name, tmp_path):
    model = small(name)
    h, w = input_size(model)
    x = torch.rand(2, 3, h, w)
    out = model(x)
    expected = (2, 3, h, w) if isinstance(model, FCDenseNet) else (2, 3)
    assert tuple(out.shape) == expected
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    rebuilt = build_architecture(type(model).__name__, model_config(model))
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]

    model.eval()
    directory = save_pretrained(model, pretrained_config(model), tmp_path / "w")
    loaded, _ = load_pretrained(directory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_pytorch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from tiramisu.export import export_onnx

    model = small(name).eval()
    path = export_onnx(model, pretrained_config(model), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h, w = input_size(model)
    x = torch.rand(1, 3, h, w)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-3, atol=1e-4)
