"""Stage hand-over (UNet.load_stage_weights) and the weight-reading helpers."""
from __future__ import annotations

import pytest
import torch

from medcl.models import UNet
from medcl.models.weights import read_state_dict, strip_key_prefixes, sum_input_channels

FEATS = (4, 8, 16)


def _pair(norm: str = "instance"):
    torch.manual_seed(0)
    src = UNet(in_channels=1, num_classes=3, features=FEATS, norm=norm)
    # Make every source tensor (buffers included) distinguishable from a fresh init.
    with torch.no_grad():
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    torch.manual_seed(1)
    dst = UNet(in_channels=1, num_classes=3, features=FEATS, norm=norm)
    return src, dst


def _clone(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_keep_encoder_copies_encoder_exactly_and_leaves_the_rest(norm):
    src, dst = _pair(norm)
    source = _clone(src.state_dict())
    before = _clone(dst.state_dict())
    report = dst.load_stage_weights(source, keep=("encoder",))
    after = dst.state_dict()
    enc_keys = [k for k in after if k.startswith("encoder.")]
    assert enc_keys and sorted(report.loaded) == sorted(enc_keys)
    for k, v in after.items():
        if k.startswith("encoder."):
            assert torch.equal(v, source[k]), k
        else:
            assert torch.equal(v, before[k]), k  # decoder and heads untouched
    assert report.missing == () and report.unexpected == ()
    assert {k.split(".")[0] for k in report.skipped} == {"decoder", "seg_head", "global_head", "local_head"}


def test_keep_encoder_decoder_from_checkpoint_file_with_ddp_prefix(tmp_path):
    src, dst = _pair()
    source = _clone(src.state_dict())
    before = _clone(dst.state_dict())
    path = tmp_path / "local_stage.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, path)
    report = dst.load_stage_weights(str(path), keep=("encoder", "decoder"))
    after = dst.state_dict()
    for k, v in after.items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(v, source[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert len(report.loaded) == sum(1 for k in after if k.startswith(("encoder.", "decoder.")))


def test_loaded_model_computes_what_the_source_encoder_computes():
    src, dst = _pair()
    dst.load_stage_weights(src.state_dict(), keep="encoder")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        _, b_src = src.eval().encode(x)
        _, b_dst = dst.eval().encode(x)
    torch.testing.assert_close(b_dst, b_src)


def test_shape_mismatch_names_key_and_shapes():
    _, dst = _pair()
    other = UNet(in_channels=1, num_classes=3, features=(4, 8, 32))
    with pytest.raises(ValueError, match=r"'encoder\.down2\.conv\.conv1\.weight'.*\(32, 8, 3, 3\).*\(16, 8, 3, 3\)"):
        dst.load_stage_weights(other.state_dict(), keep=("encoder",))


def test_mismatch_leaves_model_unchanged():
    _, dst = _pair()
    before = _clone(dst.state_dict())
    bad = _clone(dst.state_dict())
    bad = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in bad.items()}
    bad["encoder.down2.conv.conv2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.down2.conv.conv2.weight"):
        dst.load_stage_weights(bad, keep=("encoder",))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nothing_matched_raises():
    _, dst = _pair()
    with pytest.raises(ValueError, match=r"no source weights matched .*\['encoder'\]"):
        dst.load_stage_weights({"seg_head.weight": torch.zeros(3, 4, 1, 1)}, keep=("encoder",))


def test_strict_missing_keys_and_non_strict_partial_load():
    src, dst = _pair()
    source = _clone(src.state_dict())
    del source["encoder.down2.conv.conv2.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys \['encoder\.down2\.conv\.conv2\.weight'\]"):
        dst.load_stage_weights(source, keep=("encoder",))
    before = dst.state_dict()["encoder.down2.conv.conv2.weight"].clone()
    report = dst.load_stage_weights(source, keep=("encoder",), strict=False)
    assert report.missing == ("encoder.down2.conv.conv2.weight",)
    assert torch.equal(dst.state_dict()["encoder.down2.conv.conv2.weight"], before)
    assert torch.equal(dst.state_dict()["encoder.conv0.conv1.weight"], source["encoder.conv0.conv1.weight"])


def test_batch_norm_source_into_instance_norm_model_is_caught():
    src, _ = _pair("batch")
    dst = UNet(in_channels=1, num_classes=3, features=FEATS, norm="instance")
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder\.conv0\.norm1\.running_mean'"):
        dst.load_stage_weights(src.state_dict(), keep=("encoder",))


@pytest.mark.parametrize(
    "keep,match",
    [(("encoder", "heads"), r"unknown prefixes \['heads'\]"), ((), r"keep must name at least one")],
)
def test_keep_validation(keep, match):
    _, dst = _pair()
    with pytest.raises(ValueError, match=match):
        dst.load_stage_weights({}, keep=keep)


def test_missing_and_invalid_files(tmp_path):
    _, dst = _pair()
    with pytest.raises(FileNotFoundError, match=r"nope\.pt' does not exist"):
        dst.load_stage_weights(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read weights file .*junk\.pt"):
        dst.load_stage_weights(junk)
    with pytest.raises(ValueError, match=r"is not a file"):
        dst.load_stage_weights(tmp_path)
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 1, "optim": {"lr": torch.tensor(0.1)}}, nested)
    with pytest.raises(TypeError, match=r"holds no state_dict.*\['epoch', 'optim'\]"):
        dst.load_stage_weights(nested)
    with pytest.raises(TypeError, match=r"source must be a state_dict mapping or a path"):
        dst.load_stage_weights(42)


def test_read_state_dict_unwraps_known_wrappers(tmp_path):
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    for wrapper in ("model_state_dict", "state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: sd, "step": 7}, path)
        out = read_state_dict(path)
        assert set(out) == {"a.weight", "b"} and torch.equal(out["a.weight"], torch.ones(2))


def test_strip_key_prefixes():
    t = torch.zeros(1)
    out = strip_key_prefixes({"module.encoder.backbone.conv1.weight": t, "fc.bias": t}, ("module.", "encoder.", "backbone."))
    assert set(out) == {"conv1.weight", "fc.bias"}
    with pytest.raises(ValueError, match=r"'module\.x' and 'x' both map to 'x'"):
        strip_key_prefixes({"module.x": t, "x": t}, ("module.",))


def test_sum_input_channels():
    w = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    out = sum_input_channels(w, 1)
    expected = torch.tensor([[[[0 + 2 + 4, 1 + 3 + 5]]], [[[6 + 8 + 10, 7 + 9 + 11]]]], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert sum_input_channels(w, 3) is w
    with pytest.raises(ValueError, match=r"3 input channels to 2"):
        sum_input_channels(w, 2)
