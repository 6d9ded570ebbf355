"""ResNetEncoder / ResNetClassifier: shapes, torchvision-format weight files, linear probe."""
from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from medcl.models import ProjectionHead, ResNetClassifier, ResNetEncoder


@pytest.mark.parametrize(
    "kwargs,in_shape,out_shape",
    [
        (dict(arch="resnet18", in_channels=1), (2, 1, 32, 32), (2, 512)),
        (dict(arch="resnet18", in_channels=1, small_input=True), (2, 1, 32, 32), (2, 512)),
        (dict(arch="resnet18", in_channels=3), (2, 3, 32, 32), (2, 512)),
        (dict(arch="resnet18", in_channels=3, small_input=True), (1, 3, 28, 28), (1, 512)),
        (dict(arch="resnet50", in_channels=3), (2, 3, 32, 32), (2, 2048)),
    ],
)
def test_feature_shapes(kwargs, in_shape, out_shape):
    torch.manual_seed(0)
    enc = ResNetEncoder(**kwargs).eval()
    with torch.no_grad():
        out = enc(torch.randn(in_shape))
    assert out.shape == out_shape
    assert enc.feature_dim == out_shape[1]
    assert not any(k.startswith("backbone.fc.") for k in enc.state_dict())


def test_stem_geometry():
    default = ResNetEncoder("resnet18", in_channels=1)
    assert default.backbone.conv1.weight.shape == (64, 1, 7, 7)
    assert default.backbone.conv1.stride == (2, 2)
    assert isinstance(default.backbone.maxpool, torch.nn.MaxPool2d)
    small = ResNetEncoder("resnet18", in_channels=1, small_input=True)
    assert small.backbone.conv1.weight.shape == (64, 1, 3, 3)
    assert small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    # 32x32 keeps 32x32 into layer1 without the ImageNet stem, 8x8 with it.
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        b = small.eval().backbone
        assert b.maxpool(b.relu(b.bn1(b.conv1(x)))).shape[-2:] == (32, 32)
        b = default.eval().backbone
        assert b.maxpool(b.relu(b.bn1(b.conv1(x)))).shape[-2:] == (8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="resnet19"), r"arch must be one of .*'resnet19'"),
        (dict(in_channels=2), r"in_channels must be 1 or 3, got 2"),
        (dict(in_channels=True), r"in_channels must be 1 or 3, got True"),
    ],
)
def test_encoder_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNetEncoder(**kwargs)


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state_dict (3-channel conv1, fc included) with non-default BN statistics."""
    torch.manual_seed(42)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.copy_(torch.rand_like(buf) + 0.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(sd, path)
    return path, sd, model


def test_weights_file_round_trip_into_one_channel(tv_resnet18_file):
    path, saved, _ = tv_resnet18_file
    enc = ResNetEncoder("resnet18", in_channels=1, weights_path=path)
    got = enc.backbone.state_dict()
    torch.testing.assert_close(got["conv1.weight"], saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(got["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])
    assert torch.equal(got["layer4.1.bn2.running_var"], saved["layer4.1.bn2.running_var"])
    for k, v in got.items():
        if k != "conv1.weight":
            assert torch.equal(v, saved[k]), k
    report = enc.load_report
    assert report.adapted == ("conv1.weight",)
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert report.missing == () and len(report.loaded) == len(got)


def test_one_channel_features_equal_rgb_features_of_grey_copy(tv_resnet18_file):
    path, _, model = tv_resnet18_file
    reference = model.eval()
    reference.fc = torch.nn.Identity()
    enc = ResNetEncoder("resnet18", in_channels=1, weights_path=path).eval()
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(grey), reference(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_prefixed_and_wrapped_sources_load(tv_resnet18_file, tmp_path):
    _, saved, _ = tv_resnet18_file
    prefixed = {f"module.encoder.backbone.{k}": v for k, v in saved.items()}
    prefixed["module.projection_head.fc1.weight"] = torch.zeros(4, 512)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": prefixed}, path)
    enc = ResNetEncoder("resnet18", in_channels=3)
    report = enc.load_weights(path)
    assert report.unexpected == ("projection_head.fc1.weight",)
    assert torch.equal(enc.backbone.conv1.weight, saved["conv1.weight"])
    # An encoder's own state_dict and a classifier's load back too.
    clf = ResNetClassifier(enc, num_classes=2)
    fresh = ResNetEncoder("resnet18", in_channels=3)
    fresh.load_weights(clf.state_dict())
    assert torch.equal(fresh.backbone.layer2[0].downsample[0].weight, saved["layer2.0.downsample.0.weight"])


def test_weight_errors(tv_resnet18_file, tmp_path):
    _, saved, _ = tv_resnet18_file
    with pytest.raises(FileNotFoundError, match=r"missing\.pth' does not exist"):
        ResNetEncoder("resnet18", in_channels=1, weights_path=tmp_path / "missing.pth")
    bad = dict(saved)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight'.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        ResNetEncoder("resnet18", in_channels=3).load_weights(bad)
    with pytest.raises(ValueError, match=r"'conv1\.weight'.*\(64, 3, 7, 7\).*\(64, 1, 3, 3\)"):
        ResNetEncoder("resnet18", in_channels=1, small_input=True).load_weights(saved)
    partial = {k: v for k, v in saved.items() if not k.startswith("layer4.")}
    enc = ResNetEncoder("resnet18", in_channels=3)
    before = enc.backbone.conv1.weight.clone()
    with pytest.raises(ValueError, match=r"missing keys \['layer4\.0"):
        enc.load_weights(partial)
    assert torch.equal(enc.backbone.conv1.weight, before)  # a failed load changes nothing
    report = enc.load_weights(partial, strict=False)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    with pytest.raises(ValueError, match=r"no source weights matched"):
        enc.load_weights({"decoder.up1.upsample.weight": torch.zeros(1)})


def test_safetensors_without_package_raises_clearly(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"optional package 'safetensors'"):
        ResNetEncoder("resnet18", in_channels=3, weights_path=path)


def test_safetensors_round_trip(tv_resnet18_file, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    _, saved, _ = tv_resnet18_file
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    enc = ResNetEncoder("resnet18", in_channels=3, weights_path=path)
    assert torch.equal(enc.backbone.layer3[1].conv2.weight, saved["layer3.1.conv2.weight"])


def test_classifier_logits_and_probabilities():
    torch.manual_seed(0)
    clf = ResNetClassifier(ResNetEncoder("resnet18", in_channels=1, small_input=True), num_classes=3).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        logits = clf(x)
        feats = clf.encoder(x)
        torch.testing.assert_close(logits, feats @ clf.classifier.weight.T + clf.classifier.bias)
        probs = clf.predict_proba(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    ml = ResNetClassifier(clf.encoder, num_classes=3, multilabel=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(ml.predict_proba(x), 1 / (1 + torch.exp(-ml(x))))


def test_freeze_encoder_linear_probe():
    torch.manual_seed(0)
    clf = ResNetClassifier(ResNetEncoder("resnet18", in_channels=1, small_input=True), num_classes=2)
    clf.freeze_encoder().train()
    assert clf.encoder_frozen and not clf.encoder.training and clf.classifier.training
    bn_before = clf.encoder.backbone.bn1.running_mean.clone()
    w_before = clf.encoder.backbone.conv1.weight.clone()
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(clf(torch.randn(4, 1, 16, 16)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in clf.encoder.parameters())
    assert clf.classifier.weight.grad is not None
    assert torch.equal(clf.encoder.backbone.bn1.running_mean, bn_before)
    assert torch.equal(clf.encoder.backbone.conv1.weight, w_before)
    clf.unfreeze_encoder()
    assert clf.encoder.training and all(p.requires_grad for p in clf.encoder.parameters())


def test_classifier_validation():
    enc = ResNetEncoder("resnet18", in_channels=1)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 0"):
        ResNetClassifier(enc, num_classes=0)
    with pytest.raises(TypeError, match=r"encoder must be a ResNetEncoder, got Linear"):
        ResNetClassifier(torch.nn.Linear(2, 2), num_classes=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\), got \(2, 3, 16, 16\)"):
        enc(torch.zeros(2, 3, 16, 16))


def test_projection_head_on_encoder_features():
    enc = ResNetEncoder("resnet18", in_channels=1, small_input=True).eval()
    head = ProjectionHead(enc.feature_dim, 256, 128)
    with torch.no_grad():
        assert head(enc(torch.randn(2, 1, 16, 16))).shape == (2, 128)
