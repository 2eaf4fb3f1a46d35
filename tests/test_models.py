import math

import pytest
import torch
from torch import nn

import tiramisu
from tiramisu.models import DenseBlock, DenseLayer, FCDenseNet, TransitionUp
from tiramisu.models import efficient as efficient_impl


def n_trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def n_with_running_stats(m: nn.Module) -> int:
    return n_trainable(m) + sum(
        b.numel() for name, b in m.named_buffers() if not name.endswith("num_batches_tracked")
    )


@pytest.mark.parametrize(
    "name, trainable, with_stats",
    [
        ("fcdensenet56", 1_376_795, 1_397_963),
        ("fcdensenet67", 3_463_243, 3_502_923),
        ("fcdensenet103", 9_322_091, 9_425_163),
    ],
)
def test_fcdensenet_parameter_counts_match_the_brief(name, trainable, with_stats):
    model = tiramisu.create_model(name, num_classes=11)
    assert n_trainable(model) == trainable
    assert n_with_running_stats(model) == with_stats


def test_fcdensenet103_channel_sequence():
    model = tiramisu.create_model("fcdensenet103")
    assert model.first_conv.out_channels == 48
    assert [b.stack_channels for b in model.down_blocks] == [112, 192, 304, 464, 656]
    assert model.bottleneck.stack_channels == 896
    assert model.bottleneck.out_channels == 15 * 16  # only the new maps go up
    assert [b.stack_channels for b in model.up_blocks] == [1088, 816, 576, 384, 256]
    assert model.classifier.in_channels == 256
    # Transposed convs act on the previous block's new maps only: n*k in and out.
    ups = [tu.conv for tu in model.trans_up]
    assert [(c.in_channels, c.out_channels) for c in ups] == [
        (240, 240),
        (192, 192),
        (160, 160),
        (112, 112),
        (80, 80),
    ]


def test_dense_connectivity_each_layer_sees_all_earlier_maps():
    block = DenseBlock(5, 10, 3, keep_input=True)
    assert [layer.norm1.num_features for layer in block.layers] == [10, 13, 16, 19, 22]
    assert [layer.conv2.in_channels for layer in block.layers] == [10, 13, 16, 19, 22]
    x = torch.randn(2, 10, 8, 8)
    out = block(x)
    assert out.shape == (2, 25, 8, 8)
    torch.testing.assert_close(out[:, :10], x)  # the input is passed through unchanged
    assert DenseBlock(5, 10, 3, keep_input=False)(x).shape == (2, 15, 8, 8)


def test_dense_layer_output_depends_on_every_earlier_feature():
    layer = DenseLayer(6, 4).eval()
    feats = [torch.randn(1, 2, 5, 5, requires_grad=True) for _ in range(3)]
    layer(feats).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


@pytest.mark.parametrize("size", [(32, 32), (97, 131), (64, 33), (360, 480)])
def test_output_has_input_size(size):
    model = tiramisu.create_model("fcdensenet56", num_classes=5).eval()
    if size == (360, 480):  # a smaller model keeps the full-frame case fast
        model = FCDenseNet(
            growth_rate=4,
            down_blocks=(1,) * 5,
            bottleneck_layers=1,
            first_conv_channels=8,
            num_classes=5,
        ).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5, *size)


def test_bilinear_variant_same_params_and_shapes():
    t = tiramisu.create_model("fcdensenet56")
    b = tiramisu.create_model("fcdensenet56", upsampling="bilinear")
    assert n_trainable(b) == n_trainable(t)
    assert isinstance(b.trans_up[0].conv, nn.Conv2d)
    with torch.no_grad():
        assert b.eval()(torch.randn(2, 3, 97, 131)).shape == (2, 11, 97, 131)


def test_transition_up_crops_to_the_skip_centre():
    tu = TransitionUp(4, "transposed")
    x, skip = torch.randn(1, 4, 11, 15), torch.randn(1, 6, 22, 30)
    up = tu.conv(x)
    assert up.shape[-2:] == (23, 31)
    out = tu(x, skip)
    assert out.shape == (1, 10, 22, 30)
    torch.testing.assert_close(out[:, :4], up[..., 0:22, 0:30])
    torch.testing.assert_close(out[:, 4:], skip)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 31, 64), "at least 32"),
        ((1, 3, 64, 16), "at least 32"),
        ((1, 1, 64, 64), "3 input channels"),
        ((3, 64, 64), "4-D"),
    ],
)
def test_bad_input_shapes_raise_value_error_naming_the_shape(shape, message):
    model = tiramisu.create_model("fcdensenet56")
    with pytest.raises(ValueError, match=message) as info:
        model(torch.randn(*shape))
    assert str(tuple(shape)) in str(info.value)


def test_greyscale_model():
    model = tiramisu.create_model("fcdensenet56", in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 40, 50)).shape == (1, 2, 40, 50)


def test_he_uniform_init():
    model = tiramisu.create_model("fcdensenet103")
    conv = model.up_blocks[0].layers[5].conv2  # fan_in = C * 9
    bound = math.sqrt(6 / (conv.in_channels * 9))
    w = conv.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.98 * bound  # uniform on [-b, b]: the extremes are reached
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert torch.count_nonzero(conv.bias) == 0
    tconv = model.trans_up[0].conv
    tbound = math.sqrt(6 / (tconv.out_channels * 9))
    assert tconv.weight.abs().max() <= tbound
    assert abs(tconv.weight.std().item() - tbound / math.sqrt(3)) < 0.02 * tbound


def test_gradient_reaches_the_first_layer():
    model = tiramisu.create_model("fcdensenet56", num_classes=3)
    out = model(torch.randn(2, 3, 32, 32))
    loss = nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    g = model.first_conv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_configurable_fcdensenet():
    model = FCDenseNet(
        in_channels=4,
        num_classes=2,
        growth_rate=8,
        down_blocks=(2, 3, 4),
        bottleneck_layers=5,
        up_blocks=(1, 2, 3),
        first_conv_channels=16,
        dropout=0.0,
    )
    assert [len(b.layers) for b in model.up_blocks] == [1, 2, 3]
    assert model.min_size == 8
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 4, 9, 17)).shape == (1, 2, 9, 17)
    with pytest.raises(ValueError, match="up_blocks"):
        FCDenseNet(down_blocks=(2, 2), up_blocks=(2,))


@pytest.mark.parametrize(
    "name, millions",
    [
        ("densenet40_k12", 1.0),
        ("densenet100_k12", 7.0),
        ("densenet_bc100_k12", 0.8),
        ("densenet_bc250_k24", 15.3),
        ("densenet_bc190_k40", 25.6),
    ],
)
def test_cifar_densenet_counts_round_to_the_paper(name, millions):
    model = tiramisu.create_model(name, num_classes=10)
    assert round(n_trainable(model) / 1e6, 1) == millions


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_imagenet_densenet_counts_equal_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    ours = tiramisu.create_model(name)
    theirs = getattr(torchvision.models, name)(weights=None)
    assert n_trainable(ours) == n_trainable(theirs)
    assert n_with_running_stats(ours) == n_with_running_stats(theirs)


def test_densenet_variants_b_and_c():
    plain = tiramisu.DenseNet((3, 3, 3), growth_rate=4, num_init_features=8)
    b = tiramisu.DenseNet((3, 3, 3), growth_rate=4, num_init_features=8, bottleneck_width=4)
    c = tiramisu.DenseNet((3, 3, 3), growth_rate=4, num_init_features=8, compression=0.5)
    assert plain.blocks[0].layers[0].conv1 is None
    assert b.blocks[0].layers[0].conv1.out_channels == 16
    # 8 + 3*4 = 20 maps after block 0: C keeps floor(0.5 * 20) = 10, plain keeps all 20.
    assert plain.transitions[0].out_channels == 20
    assert c.transitions[0].out_channels == 10
    assert c.blocks[1].in_channels == 10
    for m in (plain, b, c):
        assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_densenet_shares_the_segmenters_dense_layer():
    seg = tiramisu.create_model("fcdensenet56")
    cls = tiramisu.create_model("densenet40_k12")
    assert type(seg.down_blocks[0]) is type(cls.blocks[0]) is DenseBlock
    assert seg.down_blocks[0].layers[0].conv2.bias is not None  # official FC-DenseNet code
    assert cls.blocks[0].layers[0].conv2.bias is None


def test_registry():
    names = tiramisu.list_models()
    assert {"fcdensenet56", "fcdensenet67", "fcdensenet103", "densenet121"} <= set(names)
    assert tiramisu.list_models("fcdensenet*") == ["fcdensenet103", "fcdensenet56", "fcdensenet67"]
    m = tiramisu.create_model("fcdensenet67", num_classes=4, dropout=0.0)
    assert m.classifier.out_channels == 4 and m.config["dropout"] == 0.0
    with pytest.raises(ValueError, match="unknown model"):
        tiramisu.create_model("fcdensenet42")
    with pytest.raises(ValueError, match="cannot build"):
        tiramisu.create_model("fcdensenet56", not_a_parameter=1)


def _naive_and_efficient(down_blocks, dropout):
    """A small FC-DenseNet and its memory-efficient twin with the same weights."""
    naive = FCDenseNet(
        growth_rate=4,
        down_blocks=down_blocks,
        bottleneck_layers=2,
        first_conv_channels=8,
        num_classes=3,
        dropout=dropout,
    )
    efficient = FCDenseNet(**{**naive.config, "memory_efficient": True})
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


def _run_step(model, x, seed):
    torch.manual_seed(seed)
    model.train()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    ("dropout", "chunk", "device"),
    [
        (0.0, None, "cpu"),
        (0.2, None, "cpu"),
        (0.2, 2000, "cpu"),
        pytest.param(0.0, None, "cuda", marks=_CUDA),
        pytest.param(0.2, 2000, "cuda", marks=_CUDA),
    ],
)
def test_memory_efficient_fcdensenet_equals_naive(dropout, chunk, device, monkeypatch):
    if chunk is not None:  # backward in channel chunks of a few maps, as at full resolution
        monkeypatch.setattr(efficient_impl, "_CHUNK_ELEMENTS", chunk)
    if device == "cuda":  # full-precision convolutions, so only summation order differs
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    naive, efficient = _naive_and_efficient(down_blocks=(2, 3), dropout=dropout)
    naive.to(device)
    efficient.to(device)
    x = torch.randn(2, 3, 20, 24, device=device)
    y0, g0 = _run_step(naive, x, seed=5)  # same seed: the same dropout masks
    y1, g1 = _run_step(efficient, x, seed=5)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
    # BatchNorm running statistics are updated exactly once per step, as in the naive path.
    for (n, a), b in zip(naive.state_dict().items(), efficient.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    naive.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), naive(x), rtol=1e-5, atol=1e-5)
        with tiramisu.models.batch_statistics(naive), tiramisu.models.batch_statistics(efficient):
            torch.testing.assert_close(efficient(x), naive(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_memory_efficient_densenet_bc_equals_naive(chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(efficient_impl, "_CHUNK_ELEMENTS", chunk)
    bc = tiramisu.DenseNet((2, 3), growth_rate=4, bottleneck_width=4, compression=0.5)
    eff = tiramisu.DenseNet(**{**bc.config, "memory_efficient": True})
    eff.load_state_dict(bc.state_dict())
    x = torch.randn(2, 3, 16, 16)
    y0, g0 = _run_step(bc, x, seed=1)
    y1, g1 = _run_step(eff, x, seed=1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_memory_efficient_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    naive, efficient = _naive_and_efficient(down_blocks=(2, 2), dropout=0.0)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    grads = []
    for m in (naive, efficient):
        m.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        grads.append(m.first_conv.weight.grad)
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert rel < 2e-2  # bf16 rounding only


def test_efficient_block_keeps_only_a_linear_amount_of_activations():
    """Count the bytes autograd saves for one block: quadratic naive, linear efficient."""

    def saved_bytes(efficient: bool, n: int) -> int:
        block = DenseBlock(n, 8, 4, dropout=0.2, memory_efficient=efficient).train()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(2, 8, 16, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        return total

    naive = [saved_bytes(False, n) for n in (4, 8, 16)]
    efficient = [saved_bytes(True, n) for n in (4, 8, 16)]
    # Doubling the depth: naive saves about 4x more (quadratic), efficient about 2x (linear).
    assert naive[2] / naive[1] > 3.0
    assert efficient[2] / efficient[1] < 2.2
    assert efficient[2] < 0.3 * naive[2]


def test_keep_mask_probability_layout_and_seeding():
    from tiramisu.models.ops import dropout, keep_mask

    x = torch.empty(2, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    m1 = keep_mask(x, 0.2)
    torch.manual_seed(3)
    m2 = keep_mask(x, 0.2)
    assert m1.dtype == torch.bool and m1.shape == x.shape
    assert m1.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(m1, m2)  # torch.manual_seed decides the mask
    assert not torch.equal(keep_mask(x, 0.2), m1)  # and the generator moves on
    # 65,536 draws: the keep rate is within 4 standard deviations (0.006) of 0.8
    assert abs(m1.float().mean().item() - 0.8) < 0.006
    # channel 0 and channel 1 are not copies of each other (layout bug check)
    assert not torch.equal(m1[:, 0], m1[:, 1])
    y = dropout(torch.ones(4, 4, 32, 32), 0.25)
    assert torch.equal(y.unique(), torch.tensor([0.0, 4 / 3]))
    assert torch.equal(dropout(y, 0.5, training=False), y)


def test_efficient_up_block_buffer_follows_channels_last_through_the_crop():
    """The transposed conv's output is cropped to the skip: a view that is neither layout's
    contiguous. The block buffer must still be channels_last, or every layer gets slow kernels."""
    from tiramisu.models.efficient import _memory_format

    x = torch.randn(1, 8, 9, 11).contiguous(memory_format=torch.channels_last)[..., :8, :10]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert _memory_format(x) == torch.channels_last
    assert _memory_format(torch.randn(1, 8, 9, 11)[..., :8, :10]) == torch.contiguous_format
    block = DenseBlock(2, 16, 4, memory_efficient=True).to(memory_format=torch.channels_last)
    skip = torch.randn(1, 8, 8, 10).contiguous(memory_format=torch.channels_last)
    out = block([x.requires_grad_(), skip])
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_subpixel_transposed_conv_equals_conv_transpose2d():
    from tiramisu.models.fcdensenet import subpixel_transposed_conv

    torch.manual_seed(0)
    for shape, c_out in (((2, 5, 7, 9), 6), ((1, 3, 1, 4), 2)):
        tc = nn.ConvTranspose2d(shape[1], c_out, 3, stride=2)
        x = torch.randn(*shape, requires_grad=True)
        ref = tc(x)
        got = subpixel_transposed_conv(x, tc.weight, tc.bias)
        assert got.shape == ref.shape == (shape[0], c_out, 2 * shape[2] + 1, 2 * shape[3] + 1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, [x, tc.weight, tc.bias], g)
        grads = torch.autograd.grad(got, [x, tc.weight, tc.bias], g)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # FC-DenseNet takes this path under CPU bf16 autocast: same output within bf16 rounding.
    up = TransitionUp(4)
    x, skip = torch.randn(1, 4, 6, 7), torch.randn(1, 3, 12, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = up(x, skip)
    torch.testing.assert_close(fast.float(), up(x, skip), rtol=0.05, atol=0.05)


def test_efficient_transition_down_keeps_only_its_input():
    from tiramisu.models import TransitionDown

    def saved(td, x):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = td(x)
        return total, y

    torch.manual_seed(0)
    naive = TransitionDown(8, dropout=0.2).train()
    eff = TransitionDown(8, dropout=0.2, memory_efficient=True).train()
    eff.load_state_dict(naive.state_dict())
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    torch.manual_seed(1)
    naive_bytes, y0 = saved(naive, x)
    torch.manual_seed(1)
    eff_bytes, y1 = saved(eff, x)
    torch.testing.assert_close(y1, y0)
    assert eff_bytes == x.numel() * 4  # the input only; the dropout mask is kept as its seed
    assert naive_bytes > 4 * eff_bytes
    g = torch.randn_like(y0)
    gx0, gw0 = torch.autograd.grad(y0, [x, naive.conv.weight], g)
    gx1, gw1 = torch.autograd.grad(y1, [x, eff.conv.weight], g)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-6)


def test_reusing_the_output_gradient_never_corrupts_a_shared_gradient():
    """Only the new maps leave this block, so its backward reuses the output's gradient in
    place; a gradient autograd hands to two consumers (here by the addition) must survive."""
    block = DenseBlock(2, 4, 4, keep_input=False, memory_efficient=True)
    assert block.owns_output_grad
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.zeros(1, 8, 8, 8, requires_grad=True)
    (block(x) + w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    naive = DenseBlock(2, 4, 4, keep_input=False)
    naive.load_state_dict(block.state_dict())
    x2 = x.detach().clone().requires_grad_()
    naive(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_per_image_norm_is_a_switch_on_our_batchnorm():
    from tiramisu.models import batch_statistics
    from tiramisu.models.norm import BatchNorm2d

    torch.manual_seed(0)
    ours = BatchNorm2d(4).eval()
    foreign = torch.nn.BatchNorm2d(4).eval()  # e.g. after convert_sync_batchnorm
    foreign.load_state_dict(ours.state_dict())  # the same parameters and buffers
    with torch.no_grad():
        ours.running_mean.fill_(5.0)
        foreign.running_mean.fill_(5.0)
    model = torch.nn.Sequential(ours, foreign)
    x = torch.randn(2, 4, 6, 7) * 3 + 1
    expected = torch.nn.functional.instance_norm(x, eps=ours.eps)
    with batch_statistics(model):
        assert ours.per_image and "forward" in foreign.__dict__
        torch.testing.assert_close(ours(x), expected)
        torch.testing.assert_close(foreign(x), expected)
        torch.testing.assert_close(ours(x[:1]), expected[:1])  # independent of the batch
    assert not ours.per_image and "forward" not in foreign.__dict__
    assert not torch.allclose(ours(x), expected)  # running statistics again
    assert torch.equal(ours.running_mean, torch.full((4,), 5.0))


def test_transition_down_has_named_children_and_loads_older_positional_checkpoints(tmp_path):
    from tiramisu.models import FCDenseNet
    from tiramisu.pretrained import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = FCDenseNet(
        num_classes=3, growth_rate=4, down_blocks=(1, 1), bottleneck_layers=1, first_conv_channels=8
    ).eval()
    td = model.trans_down[0]
    assert [n for n, _ in td.named_children()] == ["norm", "relu", "conv", "drop", "pool"]
    names = {".norm.": ".0.", ".conv.": ".2."}
    old = {}
    for k, v in model.state_dict().items():
        for new, pos in names.items():
            if k.startswith("trans_down.") and new in k:
                k = k.replace(new, pos)
        old[k] = v
    assert "trans_down.1.2.weight" in old
    fresh = FCDenseNet(
        num_classes=3, growth_rate=4, down_blocks=(1, 1), bottleneck_layers=1, first_conv_channels=8
    ).eval()
    fresh.load_state_dict(old)
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    # A weights folder written with the old names loads too.
    config = {
        "architecture": "FCDenseNet",
        "model_config": model.config,
        "classes": ["a", "b", "c"],
        "colors": [[0, 0, 0]] * 3,
        "preprocessing": {"mean": None, "std": None, "channels": 3},
    }
    directory = save_pretrained(model, config, tmp_path / "w")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in old.items()}, str(directory / "model.safetensors"))
    loaded, _ = load_pretrained(directory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
