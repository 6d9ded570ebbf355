"""UNet: shape tables, head maths against hand-written references, parameter counts, validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcl.models import UNet
from medcl.models.heads import GlobalHead, LocalHead, ProjectionHead

TINY = (4, 8, 16)  # depth 2 -> H, W divisible by 4

# (kwargs, input shape, expected logits, expected global, expected local)
SHAPE_CASES = [
    (dict(in_channels=1, num_classes=3, features=TINY), (2, 1, 16, 16), (2, 3, 16, 16), (2, 128), (2, 128, 16, 16)),
    (dict(in_channels=1, num_classes=3, features=TINY, norm="batch"), (2, 1, 16, 16), (2, 3, 16, 16), (2, 128), (2, 128, 16, 16)),
    (dict(in_channels=3, num_classes=2, features=TINY, norm="BATCH"), (1, 3, 8, 12), (1, 2, 8, 12), (1, 128), (1, 128, 8, 12)),
    (dict(in_channels=1, num_classes=1, features=TINY, norm="instance"), (1, 1, 12, 8), (1, 1, 12, 8), (1, 128), (1, 128, 12, 8)),
    (dict(in_channels=2, num_classes=4, features=(4, 6), embed_dim=5), (3, 2, 6, 10), (3, 4, 6, 10), (3, 5), (3, 5, 6, 10)),
    (dict(in_channels=1, num_classes=3, features=(4, 4, 8, 8, 16), dropout=0.2, embed_dim=32), (2, 1, 32, 16),
     (2, 3, 32, 16), (2, 32), (2, 32, 32, 16)),
    (dict(in_channels=1, num_classes=3, features=(2, 4, 8, 16, 32), norm="batch", global_hidden_dim=7, local_hidden_dim=3),
     (1, 1, 16, 16), (1, 3, 16, 16), (1, 128), (1, 128, 16, 16)),
]


@pytest.mark.parametrize("kwargs,in_shape,logits_shape,global_shape,local_shape", SHAPE_CASES)
def test_output_shapes_eval(kwargs, in_shape, logits_shape, global_shape, local_shape):
    torch.manual_seed(0)
    net = UNet(**kwargs).eval()
    x = torch.randn(in_shape)
    with torch.no_grad():
        assert net(x).shape == logits_shape
        assert net.global_embedding(x).shape == global_shape
        local = net.local_embedding(x)
        assert local.shape == local_shape
        logits2, local2 = net.logits_and_local_embedding(x)
    assert logits2.shape == logits_shape
    torch.testing.assert_close(local2, local)
    # Local embeddings are unit vectors at every pixel.
    norms = torch.linalg.norm(local, dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_encode_decode_shapes_and_train_mode_backward(norm):
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=3, features=(4, 8, 16, 32), norm=norm).train()
    x = torch.randn(2, 1, 16, 24)
    skips, bottleneck = net.encode(x)
    assert [tuple(s.shape) for s in skips] == [(2, 4, 16, 24), (2, 8, 8, 12), (2, 16, 4, 6)]
    assert bottleneck.shape == (2, 32, 2, 3)
    dec = net.decode(skips, bottleneck)
    assert dec.shape == (2, 4, 16, 24)
    logits, local = net.logits_and_local_embedding(x)
    (logits.sum() + local.sum() + net.global_embedding(x).sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name


def test_decoder_uses_every_skip():
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=2, features=(4, 8, 16)).eval()
    skips, bottleneck = net.encode(torch.randn(1, 1, 8, 8))
    skips = [s.detach().requires_grad_(True) for s in skips]
    grads = torch.autograd.grad(net.decode(skips, bottleneck).pow(2).sum(), skips)
    assert all(g.abs().sum() > 0 for g in grads)


def test_batch_one_instance_norm_trains():
    net = UNet(in_channels=1, num_classes=2, features=(4, 8)).train()
    net(torch.randn(1, 1, 8, 8)).sum().backward()


def test_local_embedding_matches_hand_computed_head():
    torch.manual_seed(1)
    net = UNet(in_channels=1, num_classes=2, features=(4, 8), local_hidden_dim=5, embed_dim=6).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        feats = net.decode(*net.encode(x))  # (B, 4, H, W)
        w1 = net.local_head.conv1.weight[:, :, 0, 0]
        w2 = net.local_head.conv2.weight[:, :, 0, 0]
        h = torch.relu(torch.einsum("oc,bchw->bohw", w1, feats) + net.local_head.conv1.bias[None, :, None, None])
        z = torch.einsum("oc,bchw->bohw", w2, h) + net.local_head.conv2.bias[None, :, None, None]
        expected = z / z.pow(2).sum(dim=1, keepdim=True).sqrt()
        torch.testing.assert_close(net.local_embedding(x), expected)


@pytest.mark.parametrize("size,grid,pool", [
    (16, 4, lambda b: b),  # 4x4 bottleneck on a 4x4 grid: the map itself
    (8, 4, lambda b: b.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)),  # 2x2 -> every value twice per axis
    (8, 1, lambda b: b.mean(dim=(2, 3), keepdim=True)),  # grid 1: the global average pool of methods §3
])
def test_global_embedding_matches_hand_computed_head(size, grid, pool):
    """Bottleneck pooled to grid x grid, flattened channel-major, then Linear -> ReLU -> Linear."""
    torch.manual_seed(2)
    net = UNet(in_channels=1, num_classes=2, features=(4, 8, 6), global_hidden_dim=3, embed_dim=5,
               global_grid=grid).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        _, bottleneck = net.encode(x)
        pooled = pool(bottleneck).reshape(3, -1)
        assert pooled.shape == (3, 6 * grid * grid)
        mlp = net.global_head.mlp
        expected = torch.relu(pooled @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        out = net.global_embedding(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))  # not normalised


def test_segmentation_logits_are_one_by_one_conv_of_decoder_map():
    torch.manual_seed(3)
    net = UNet(in_channels=1, num_classes=3, features=(4, 8)).eval()
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        feats = net.decode(*net.encode(x))
        expected = torch.einsum("kc,bchw->bkhw", net.seg_head.weight[:, :, 0, 0], feats)
        expected = expected + net.seg_head.bias[None, :, None, None]
        torch.testing.assert_close(net(x), expected)


def _unet_param_count(c_in: int, k: int, f: tuple[int, ...]) -> int:
    """Naive count: 3x3 bias-free convs, 2 affine params per norm channel, 2x2 transposed convs with bias."""

    def block(a: int, b: int) -> int:
        return 9 * a * b + 9 * b * b + 2 * 2 * b

    n = block(c_in, f[0])
    for i in range(1, len(f)):
        n += block(f[i - 1], f[i])  # down i
        n += 4 * f[i] * f[i - 1] + f[i - 1] + block(2 * f[i - 1], f[i - 1])  # up i
    return n + f[0] * k + k  # 1x1 seg head


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_paper_preset_parameter_count(norm):
    net = UNet.paper(in_channels=1, num_classes=3, norm=norm)
    assert net.features == (64, 128, 256, 512, 1024)
    body = _count(net.encoder) + _count(net.decoder) + _count(net.seg_head)
    assert body == _unet_param_count(1, 3, (64, 128, 256, 512, 1024))
    assert 28e6 <= body <= 35e6  # published ~31 M
    heads = _count(net.global_head) + _count(net.local_head)
    # global head: the 1024-channel bottleneck pooled to 4x4 and flattened -> 1024 -> 128
    assert heads == (1024 * 16 * 1024 + 1024 + 1024 * 128 + 128) + (64 * 64 + 64 + 64 * 128 + 128)
    assert _count(net) == body + heads


def test_cpu_preset():
    net = UNet.cpu(in_channels=1, num_classes=3)
    assert net.features == (16, 32, 64, 128, 256) and net.size_divisor == 16
    assert _count(net.encoder) + _count(net.decoder) + _count(net.seg_head) == _unet_param_count(
        1, 3, (16, 32, 64, 128, 256)
    )
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, 32, 32)


def test_state_dict_prefixes_read_like_the_diagram():
    net = UNet(in_channels=1, num_classes=2, features=(4, 8, 16))
    keys = list(net.state_dict())
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "seg_head", "global_head", "local_head"}
    for expected in (
        "encoder.conv0.conv1.weight",
        "encoder.down1.conv.norm2.bias",
        "encoder.down2.conv.conv2.weight",
        "decoder.up2.upsample.weight",
        "decoder.up1.conv.conv1.weight",
        "seg_head.weight",
        "global_head.mlp.fc1.weight",
        "local_head.conv2.weight",
    ):
        assert expected in keys


@pytest.mark.parametrize(
    "in_shape,match",
    [
        ((1, 1, 18, 16), r"18x16.*divisible by 2\*\*depth=4"),
        ((1, 1, 16, 14), r"16x14.*divisible by 2\*\*depth=4"),
        ((1, 3, 16, 16), r"\(B, 1, H, W\), got \(1, 3, 16, 16\)"),
        ((1, 16, 16), r"\(B, 1, H, W\), got \(1, 16, 16\)"),
    ],
)
def test_input_shape_errors(in_shape, match):
    net = UNet(in_channels=1, num_classes=2, features=(4, 8, 16))
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(in_shape))
    with pytest.raises(ValueError, match=match):
        net.global_embedding(torch.zeros(in_shape))


def test_decode_checks_number_of_skips():
    net = UNet(in_channels=1, num_classes=2, features=(4, 8, 16))
    with pytest.raises(ValueError, match=r"len\(skips\)=1 must equal depth=2"):
        net.decode([torch.zeros(1, 4, 8, 8)], torch.zeros(1, 16, 2, 2))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(norm="group"), ValueError, r"norm must be one of .*'group'"),
        (dict(features=(16,)), ValueError, r"len\(features\)=1 must be >= 2"),
        (dict(features=(16, 0)), ValueError, r"features\[1\] must be >= 1, got 0"),
        (dict(features=(16, 32.0)), TypeError, r"features\[1\] must be an int"),
        (dict(features="abc"), TypeError, r"features must be a sequence"),
        (dict(in_channels=0), ValueError, r"in_channels must be >= 1, got 0"),
        (dict(num_classes=0), ValueError, r"num_classes must be >= 1, got 0"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout="0.1"), TypeError, r"dropout must be a float"),
        (dict(embed_dim=0), ValueError, r"embed_dim must be >= 1, got 0"),
        (dict(global_hidden_dim=-1), ValueError, r"global_hidden_dim must be >= 1, got -1"),
        (dict(global_grid=0), ValueError, r"global_grid must be >= 1, got 0"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    base = dict(in_channels=1, num_classes=2, features=(4, 8))
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        UNet(**base)


def test_projection_head_is_linear_relu_linear():
    torch.manual_seed(4)
    head = ProjectionHead(6, 4, 3)
    x = torch.randn(5, 6)
    expected = F.relu(x @ head.fc1.weight.T + head.fc1.bias) @ head.fc2.weight.T + head.fc2.bias
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (5, 3)
    with pytest.raises(ValueError, match=r"hidden_dim must be >= 1, got 0"):
        ProjectionHead(6, 0)
    with pytest.raises(TypeError, match=r"in_dim must be an int"):
        ProjectionHead(6.0, 4)


def test_standalone_heads_shapes():
    assert GlobalHead(8, 4, 16)(torch.randn(2, 8, 3, 5)).shape == (2, 16)
    out = LocalHead(8, 4, 16)(torch.randn(2, 8, 3, 5))
    assert out.shape == (2, 16, 3, 5)
    torch.testing.assert_close(torch.linalg.norm(out, dim=1), torch.ones(2, 3, 5))
