import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from paragon_export.arch import MUNet, ParagonSR2, VARIANTS, build, calibrate_kernels, detect_variant, magic_kernel_taps
from paragon_export.arch.magic import MagicUpsampler
from paragon_export.arch.paragonsr2 import LayerScale
from conftest import COMPAT, make_model

GOLDEN = sorted(COMPAT.glob("*.safetensors"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_traiNNer_checkpoints_reproduce(path):
    info = json.loads((COMPAT / "index.json").read_text())[path.name]
    t = load_file(str(path))
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    det = detect_variant(sd)
    assert (det["variant"], det["upsampler"], det["fused"]) == (info["variant"], "legacy", False)
    m = build(det["variant"], scale=info["scale"], upsampler="legacy")
    m.load_state_dict(sd, strict=True)
    m.eval()
    x = t["io.input"]
    with torch.no_grad():
        assert (m(x) - t["io.out_static"]).abs().max() <= 1e-5
        m.set_dynamic_inference(True)
        assert (m(x) - t["io.out_dynamic"]).abs().max() <= 1e-5
        m.set_dynamic_inference(False)
        fused = m.fuse_for_release().eval()
        assert (fused(x) - t["io.out_fused"]).abs().max() <= 1e-5
    m.train()
    m(t["io.train_batch"])
    got = m.body[0].blocks[0].transformer.tracked_kernel
    assert (got - t["io.tracked_kernel_after_train_step.body.0.blocks.0"]).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("upsampler,scale", [("legacy", 3), ("mks2021", 4), ("pixelshuffle", 2)])
def test_detect_variant_from_shapes(variant, upsampler, scale):
    with torch.device("meta"):
        m = build(variant, scale=scale, upsampler=upsampler)
        f = ParagonSR2(**{**m.hparams, "fused": True})
    for model, fused in ((m, False), (f, True)):
        d = detect_variant(model.state_dict())
        assert d["variant"] == variant and d["upsampler"] == upsampler and d["fused"] is fused
        assert d["scale"] == (None if upsampler == "legacy" else scale)


def test_constructor_is_keyword_only_and_rejects_typos():
    with pytest.raises(TypeError):
        ParagonSR2(2, 3, 24, 2, 2, 1.5)  # noqa
    with pytest.raises(TypeError):
        ParagonSR2(scale=2, num_feat=24, num_groups=2, num_blocks=2, ffn_expansion=1.5, band_kernal_size=9)
    assert build("paragonsr2_nano", scale=2).hparams["band_kernel_size"] == 9


@pytest.mark.parametrize("upsampler", ["legacy", "mks2021", "pixelshuffle"])
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_fusion_is_exact_and_leaves_plain_convs(upsampler, scale):
    m = make_model(scale=scale, upsampler=upsampler, seed=scale)
    f = m.fuse_for_release().eval()
    x = torch.rand(2, 3, 21, 30)
    with torch.no_grad():
        assert (m(x) - f(x)).abs().max() <= 1e-5
    names = [n for n, _ in f.named_parameters()]
    assert not any("kernel_generator" in n or "gamma" in n for n in names)
    assert not any(isinstance(mod, LayerScale) for mod in f.modules())
    assert f(x).shape == (2, 3, 21 * scale, 30 * scale)


def test_parameter_counts_match_spec():
    with torch.device("meta"):
        nano, s = build("paragonsr2_nano", scale=2), build("paragonsr2_s", scale=2)
        nano_f, s_f = (ParagonSR2(**{**x.hparams, "fused": True}) for x in (nano, s))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 70_000 < count(nano) < 76_000 and 19_000 < count(nano_f) < 22_000
    assert 380_000 < count(s_f) < 430_000  # SPEC: "about 0.39M"; the code has 417k


def test_fuse_refuses_uninitialised_kernels_and_calibration_fixes_it():
    m = build("paragonsr2_nano", scale=2).eval()
    with pytest.raises(ValueError, match="never initialised"):
        m.fuse_for_release()
    g = torch.Generator().manual_seed(0)
    n = calibrate_kernels(m, [torch.rand(2, 3, 24, 24, generator=g) for _ in range(2)])
    assert n == 4 and not m.uninitialized_kernels()
    t = m.body[0].blocks[0].transformer
    assert not torch.equal(t.tracked_kernel, t.identity_kernel)
    m.fuse_for_release()


def test_calibrated_kernel_is_mean_generated_kernel():
    m = make_model()
    x = torch.rand(3, 3, 20, 20)
    calibrate_kernels(m, [x])
    b = m.body[0].blocks[0]
    t = b.transformer
    with torch.no_grad():
        h = m.conv_in(x)
        k = t.kernel_generator(t.project_in(h + b.ls1(b.context(h))))
    assert torch.allclose(t.tracked_kernel[:, 0], k.mean(0), atol=1e-6)


def test_magic_kernel_taps_and_flat_field():
    assert torch.allclose(magic_kernel_taps(2) * 32, torch.tensor([1.0, 9, 22, 22, 9, 1]))
    for s in (2, 3, 4):
        taps = magic_kernel_taps(s)
        for phase in range(s):
            assert abs(taps[phase::s].sum().item() - 1) < 1e-6
        up = MagicUpsampler(channels=2, scale=s, taps="mks2021")
        y = up(torch.full((1, 2, 9, 11), 0.37))
        assert y.shape == (1, 2, 9 * s, 11 * s)
        assert (y - 0.37).abs().max() < 1e-5  # replicate padding: no dark borders


@pytest.mark.parametrize("s", [2, 3, 4])
def test_legacy_transposed_conv_equals_nearest_then_blur(s):
    up = MagicUpsampler(channels=3, scale=s, taps="legacy")
    x = torch.rand(1, 3, 10, 13)
    sharp = up.sharpen.conv(x)
    blur = up.resample_conv
    ref = blur.conv(F.interpolate(sharp, scale_factor=s, mode="nearest"))
    assert (up(x) - ref).abs().max() < 1e-6


def test_munet_any_size_and_fixed_taps():
    d = MUNet(base_channels=8)
    x = torch.rand(2, 3, 37, 50, requires_grad=True)
    y = d(x)
    assert y.shape == (2, 1, 37, 50)
    y.mean().backward()
    assert x.grad.abs().sum() > 0
    taps = [n for n, _ in d.named_buffers() if "magic" in n or "upsample" in n]
    assert taps and not any("upsample" in n for n, _ in d.named_parameters())
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(hasattr(c, "parametrizations") for c in convs)


@pytest.mark.parametrize("taps", ["legacy", "mks2021"])
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_polyphase_form_equals_transposed_conv(taps, scale):
    """The polyphase form of the Magic resampler computes the ConvTranspose's sums, to float rounding."""
    up = MagicUpsampler(channels=4, scale=scale, taps=taps)
    assert up.form == "transpose"  # the default: fastest across runtimes (README)
    up.form = "polyphase"
    x = torch.rand(2, 4, 11, 14, generator=torch.Generator().manual_seed(scale))
    with torch.no_grad():
        got = up(x)
        up.form = "transpose"
        want = up(x)
    assert got.shape == want.shape == (2, 4, 11 * scale, 14 * scale)
    assert (got - want).abs().max() <= 1e-6
    # the form is not state: both load the same keys strictly
    other = MagicUpsampler(channels=4, scale=scale, taps=taps, form="transpose")
    other.load_state_dict(up.state_dict(), strict=True)
    with pytest.raises(ValueError, match="form"):
        MagicUpsampler(channels=4, scale=scale, taps=taps, form="resize")


def test_polyphase_taps_split_the_transposed_kernel():
    from paragon_export.arch.magic import polyphase_taps

    # legacy x2: [1,5,10,10,5,1]/16, padding 2 -> phase 0 taps (w4, w2, w0), phase 1 (w5, w3, w1) on LR offsets -1..1
    w = torch.tensor([[1.0, 5, 10, 10, 5, 1]]) / 16
    phases, before, after = polyphase_taps(w, 2, 2)
    assert (before, after) == (1, 1)
    assert torch.equal(phases * 16, torch.tensor([[[5.0, 10, 1], [1, 10, 5]]]))
    # mks2021: 3s taps, padding 2s on the replicate-padded input: 3 taps per phase, no extra padding;
    # every phase of the Magic Kernel sums to 1 (partition of unity)
    for s in (1, 2, 3, 4):
        phases, before, after = polyphase_taps(magic_kernel_taps(s)[None], s, 2 * s)
        assert phases.shape == (1, s, 3) and (before, after) == (0, 0)
        assert torch.allclose(phases.sum(-1), torch.ones(1, s))
    with pytest.raises(ValueError, match="whole LR grid"):
        polyphase_taps(torch.ones(1, 5), 2, 1)
