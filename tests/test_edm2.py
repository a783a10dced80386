"""EDM2's magnitude-preserving networks: the parts against EDM2's published formulas, the img64
presets against the paper's parameter counts, the denoiser contract, and EDM2 snapshots read
through the restricted importer.

The references below are written from the equations of Karras et al. 2024 (EDM2) in float64:
forced/traditional weight normalisation (eqs. 47, 66), mp_sum (eq. 88), mp_cat (eq. 103),
Fourier features (eq. 75), mp_silu (eq. 81). The pickles are written in EDM2's snapshot layout
(``training/training_loop.py`` of EDM2): a ``dnnlib.util.EasyDict`` with ``ema`` (the network in
float16), ``loss_fn``, ``encoder``, ``dataset_kwargs``; every EDM2 module pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` (see ``tests/test_edm_pickle.py``).
"""

import math
import pickle
import sys
import types

import pytest
import torch
from test_edm_pickle import EasyDict, _reconstruct_persistent_obj, edm_modules  # noqa: F401 (a fixture)
from torch import nn
from torch.nn import functional as F

from dmdcopy.errors import CheckpointError, ConfigError, ShapeError
from dmdcopy.io import convert, load, load_edm_pickle, read_edm_pickle, save
from dmdcopy.nets import edm2
from dmdcopy.nets.edm2 import EDM2Precond, EDM2UNet, MPConv, MPFourier, edm2_img64

TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8, logvar_channels=8)


def tiny(label_dim=0, **kw):
    return EDM2Precond(label_dim=label_dim, **{**TINY, **kw})


def randomise(module):
    """Non-zero gains everywhere (out_gain and emb_gain start at 0 and would hide a wrong network)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 0 else 1.0))
    return module.eval()


def one_line(err):
    return "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the parts


def ref_weight(w, gain=1.0, eps=1e-4):
    """EDM2 eq. 47 with eq. 66's normalisation: each output row to unit RMS, then gain / sqrt(fan_in)."""
    w = w.double()
    fan_in = w[0].numel()
    rms = w.reshape(len(w), -1).norm(dim=1) / math.sqrt(fan_in)
    return w / (eps + rms).reshape(-1, *[1] * (w.ndim - 1)) * gain / math.sqrt(fan_in)


@pytest.mark.parametrize("kernel", [[], [3, 3], [1, 1]])
def test_mpconv_normalises_its_weight_and_applies_the_gain(kernel):
    conv = MPConv(5, 7, kernel)
    x = torch.randn(4, 5) if not kernel else torch.randn(4, 5, 6, 6)
    gain = torch.tensor(0.7)
    w = ref_weight(conv.weight.detach(), 0.7)
    want = x.double() @ w.t() if not kernel else F.conv2d(x.double(), w, padding=kernel[0] // 2)
    torch.testing.assert_close(conv.eval()(x, gain=gain).double(), want, rtol=1e-5, atol=1e-5)
    # the stored weight's scale does not matter (only up to eps)
    with torch.no_grad():
        conv.weight.mul_(40.0)
    torch.testing.assert_close(conv(x, gain=gain).double(), want, rtol=1e-3, atol=1e-3)
    # training: the stored weight is forced to unit RMS rows in place (eq. 66), the output unchanged
    y = conv.train()(x, gain=gain)
    rows = conv.weight.detach().reshape(7, -1)
    torch.testing.assert_close(rows.square().mean(dim=1), torch.ones(7), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=1e-3)


def test_mp_sum_and_mp_cat_follow_the_equations():
    a, b = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 6, 5, 5, dtype=torch.float64)
    for t in (0.0, 0.3, 0.5, 0.9):
        b4 = b[:, :4]
        want = ((1 - t) * a + t * b4) / math.sqrt((1 - t) ** 2 + t**2)
        torch.testing.assert_close(edm2.mp_sum(a, b4, t), want)
        c = math.sqrt(10 / ((1 - t) ** 2 + t**2))
        want = torch.cat([a * c * (1 - t) / math.sqrt(4), b * c * t / math.sqrt(6)], dim=1)
        torch.testing.assert_close(edm2.mp_cat(a, b, t=t), want)
    # equal widths at t = 0.5: a plain concatenation
    torch.testing.assert_close(edm2.mp_cat(a, b[:, :4]), torch.cat([a, b[:, :4]], dim=1))


def test_magnitude_preservation_of_unit_variance_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 128, 8, 8, generator=g)
    rms = lambda y: y.square().mean().sqrt().item()  # noqa: E731
    assert abs(rms(edm2.mp_silu(x)) - 1) < 0.01
    y = torch.randn(64, 128, 8, 8, generator=g)
    assert abs(rms(edm2.mp_sum(x, y, 0.3)) - 1) < 0.01
    assert abs(rms(edm2.mp_cat(x[:, :32], y, t=0.7)) - 1) < 0.01
    conv = MPConv(128, 96, [3, 3]).eval()
    assert abs(rms(conv(x)[:, :, 1:-1, 1:-1]) - 1) < 0.03  # the zero-padded border has less input
    assert abs(rms(conv(x, gain=0.25)[:, :, 1:-1, 1:-1]) - 0.25) < 0.01
    lin = MPConv(128, 64, []).eval()
    assert abs(rms(lin(x[:, :, 0, 0])) - 1) < 0.03
    assert abs(rms(edm2.normalize(x * 7.0 + 1.0, dim=1)) - 1) < 1e-3  # pixel norm


def test_mpfourier_is_scaled_cosines_of_its_buffers():
    emb = MPFourier(256, bandwidth=1.0)
    c = torch.linspace(-2, 2, 9)
    want = math.sqrt(2) * torch.cos(c.double()[:, None] * emb.freqs.double() + emb.phases.double())
    torch.testing.assert_close(emb(c).double(), want, rtol=1e-5, atol=1e-5)
    assert emb(c).shape == (9, 256) and emb(c.half()).dtype is torch.float16
    # random frequencies and phases: unit RMS over the channels
    assert abs(emb(torch.randn(512)).square().mean().sqrt().item() - 1) < 0.03
    assert set(dict(emb.named_buffers())) == {"freqs", "phases"}


def test_resample_is_box_down_and_nearest_up():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(edm2.resample(x, (1, 1), "down"), F.avg_pool2d(x, 2))
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(edm2.resample(x, (1, 1), "up"), up)
    assert edm2.resample(x) is x


def ref_block(blk, x, emb):
    """One EDM2 block (Figure 21) in float64 from the equations, with filter (1, 1) resampling."""
    x, emb = x.double(), emb.double()
    w = {k: v.detach().double() for k, v in blk.named_parameters()}
    conv = lambda h, name, gain=1.0: F.conv2d(h, ref_weight(w[name + ".weight"], gain),  # noqa: E731
                                              padding=w[name + ".weight"].shape[-1] // 2)
    silu = lambda h: F.silu(h) / 0.596  # noqa: E731
    msum = lambda a, b, t: ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)  # noqa: E731
    if blk.resample_mode == "down":
        x = F.avg_pool2d(x, 2)
    elif blk.resample_mode == "up":
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if blk.flavor == "enc":
        x = conv(x, "conv_skip") if blk.conv_skip is not None else x
        x = x / (1e-4 + x.square().mean(dim=1, keepdim=True).sqrt())
    y = conv(silu(x), "conv_res0")
    c = emb @ ref_weight(w["emb_linear.weight"], w["emb_gain"]).t() + 1
    y = conv(silu(y * c[:, :, None, None]), "conv_res1")
    if blk.flavor == "dec" and blk.conv_skip is not None:
        x = conv(x, "conv_skip")
    x = msum(x, y, blk.res_balance)
    if blk.num_heads:
        B, C, H, W = x.shape
        qkv = conv(x, "attn_qkv").reshape(B, blk.num_heads, C // blk.num_heads, 3, H * W)
        qkv = qkv / (1e-4 + qkv.square().mean(dim=2, keepdim=True).sqrt())
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        a = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(q.shape[2]), dim=-1)  # (B, h, HW, HW)
        y = (v @ a.transpose(2, 3)).reshape(B, C, H, W)
        x = msum(x, conv(y, "attn_proj"), blk.attn_balance)
    return x.clamp(-blk.clip_act, blk.clip_act)


@pytest.mark.parametrize(
    "args, kw",
    [
        ((8, 16, 12, "enc", "down"),
         dict(attention=True, channels_per_head=4, res_balance=0.4, attn_balance=0.2)),
        ((24, 16, 12, "dec", "up"), dict(attention=True, channels_per_head=8, clip_act=1.5)),
        ((16, 16, 12, "dec"), {}),
    ],
)
def test_block_against_the_equations(args, kw):
    blk = randomise(edm2.Block(*args, **kw))
    x, emb = torch.randn(2, args[0], 8, 8) * 2, torch.randn(2, 12)
    assert (blk.conv_skip is None) == (args[0] == args[1]) and bool(blk.num_heads) == ("attention" in kw)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, emb).double(), ref_block(blk, x, emb), rtol=1e-4, atol=1e-4)


def ref_unet(unet, x, c_noise, labels):
    """EDM2's UNet forward (Figure 21) in float64 from the equations, over the module's blocks."""
    w = lambda name: unet.get_parameter(name + ".weight").detach().double()  # noqa: E731
    silu = lambda h: F.silu(h) / 0.596  # noqa: E731
    fourier = math.sqrt(2) * torch.cos(c_noise.double()[:, None] * unet.emb_fourier.freqs.double()
                                       + unet.emb_fourier.phases.double())
    emb = fourier @ ref_weight(w("emb_noise")).t()
    if labels is not None:
        t = unet.label_balance
        by_label = (labels.double() * math.sqrt(labels.shape[1])) @ ref_weight(w("emb_label")).t()
        emb = ((1 - t) * emb + t * by_label) / math.sqrt((1 - t) ** 2 + t**2)
    emb = silu(emb)
    h = torch.cat([x.double(), torch.ones_like(x[:, :1]).double()], dim=1)
    skips = []
    for name, blk in unet.enc.items():
        if name.endswith("conv"):
            h = F.conv2d(h, ref_weight(w(f"enc.{name}")), padding=1)
        else:
            h = ref_block(blk, h, emb)
        skips.append(h)
    for name, blk in unet.dec.items():
        if "block" in name:
            s, t = skips.pop(), unet.concat_balance
            scale = math.sqrt((h.shape[1] + s.shape[1]) / ((1 - t) ** 2 + t**2))
            h = torch.cat([h * (scale * (1 - t) / math.sqrt(h.shape[1])),
                           s * (scale * t / math.sqrt(s.shape[1]))], dim=1)
        h = ref_block(blk, h, emb)
    return F.conv2d(h, ref_weight(w("out_conv"), unet.out_gain.detach().double()), padding=1)


@pytest.mark.parametrize("label_dim", [0, 5])
def test_unet_against_the_equations(label_dim):
    net = randomise(tiny(label_dim, concat_balance=0.7, label_balance=0.4, num_blocks=2)).unet
    x, c_noise = torch.randn(2, 3, 8, 8), torch.tensor([-1.0, 0.8])
    labels = F.one_hot(torch.tensor([1, 4]), 5).float() if label_dim else None
    with torch.no_grad():
        torch.testing.assert_close(net(x, c_noise, labels).double(), ref_unet(net, x, c_noise, labels),
                                   rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- presets and keys


@pytest.mark.parametrize("size, millions", [("s", 280), ("m", 498), ("l", 777), ("xl", 1119)])
def test_img64_presets_have_the_papers_sizes(size, millions):
    with torch.device("meta"):
        net = EDM2Precond(**edm2_img64(size))
    count = sum(p.numel() for p in net.parameters())
    assert round(count / 1e6) == millions  # EDM2 Table 2 / Figure 7: 280M, 498M, 777M, 1.1B
    state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    C = edm2_img64(size)["model_channels"]
    assert state["unet.enc.64x64_conv.weight"] == (C, 4, 3, 3)  # RGB + the constant channel
    assert state["unet.emb_label.weight"] == (4 * C, 1000)
    assert state["unet.emb_fourier.freqs"] == (C,)
    assert state["unet.dec.8x8_in0.attn_qkv.weight"] == (12 * C, 4 * C, 1, 1)
    assert state["unet.out_conv.weight"] == (3, C, 3, 3) and state["unet.out_gain"] == ()
    assert state["logvar_fourier.freqs"] == (128,) and state["logvar_linear.weight"] == (1, 128)
    enc = {k.split(".")[2] for k in state if k.startswith("unet.enc.")}
    dec = {k.split(".")[2] for k in state if k.startswith("unet.dec.")}
    assert enc == {"64x64_conv"} | {f"{r}x{r}_down" for r in (32, 16, 8)} | {
        f"{r}x{r}_block{i}" for r in (64, 32, 16, 8) for i in range(3)}
    assert dec == {"8x8_in0", "8x8_in1"} | {f"{r}x{r}_up" for r in (16, 32, 64)} | {
        f"{r}x{r}_block{i}" for r in (64, 32, 16, 8) for i in range(4)}
    attn = {k.split(".")[2] for k in state if "attn_qkv" in k}
    assert attn == {f"{r}x{r}_block{i}" for r in (16, 8) for i in range(3)} | {
        "8x8_in0"} | {f"{r}x{r}_block{i}" for r in (16, 8) for i in range(4)}


def test_preset_errors():
    assert edm2_img64("S")["dropout"] == 0.0 and edm2_img64("xl", dropout=0.0)["dropout"] == 0.0
    with pytest.raises(ConfigError, match=r"size must be one of \['l', 'm', 's', 'xl'\], got 'xxl'") as err:
        edm2_img64("xxl")
    assert one_line(err)


def test_state_dict_round_trip_is_strict_and_exact(tmp_path):
    net = randomise(tiny(4))
    other = tiny(4, clip_act=256).eval()
    other.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.02, 1.0, 50.0]), torch.tensor([0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(other(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    save(net, tmp_path / "edm2.safetensors")
    back = load(tmp_path / "edm2.safetensors")
    assert type(back) is EDM2Precond and back.init_kwargs == net.init_kwargs
    with torch.no_grad():
        torch.testing.assert_close(back(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        tiny(4).load_state_dict({k: v for k, v in net.state_dict().items() if "logvar" not in k})


# ----------------------------------------------------------------------------- the denoiser


def test_denoiser_contract_and_preconditioning():
    net = randomise(tiny(5))
    x = torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 2.0, 70.0])
    idx = torch.tensor([4, 0, 2, 2])
    onehot = F.one_hot(idx, 5).float()
    with torch.no_grad():
        out = net(x, sigma, idx)
        torch.testing.assert_close(net(x, sigma, onehot), out, rtol=0, atol=0)
        # EDM's preconditioning with sigma_data 0.5 around the raw UNet
        sd = 0.5
        s = sigma[:, None, None, None]
        F_x = net.unet(x / (sd**2 + s**2).sqrt(), sigma.log() / 4, onehot)
        torch.testing.assert_close(out, sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * F_x)
        D, logvar = net(x, sigma, idx, return_logvar=True)
        torch.testing.assert_close(D, out, rtol=0, atol=0)
        assert logvar.shape == (4, 1, 1, 1)
        u = net.logvar_linear(net.logvar_fourier(sigma.log() / 4)).flatten()  # u(sigma), eq. 21
        torch.testing.assert_close(logvar.flatten(), u)
        torch.testing.assert_close(net.logvar(sigma), u)
        assert net(x.double(), sigma.double(), idx).dtype is torch.float64
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (net.label_dim, net.sample_shape, net.sigma_data) == (5, (3, 8, 8), 0.5)


def test_fresh_network_is_the_skip_path():
    # out_gain starts at 0, so F = 0 and D(x; sigma) = c_skip(sigma) x exactly
    net = tiny(0).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 3.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), c_skip[:, None, None, None] * x)


def test_training_step_keeps_weights_normalised_and_learns():
    net = tiny(3, dropout=0.1).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, sigma, labels = torch.randn(4, 3, 8, 8), torch.full((4,), 1.0), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        x_t = x + sigma[:, None, None, None] * torch.randn_like(x)
        D, logvar = net(x_t, sigma, labels, return_logvar=True)
        loss = ((D - x).square() / logvar.exp() + logvar).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert net.unet.out_gain.item() != 0
    net(x, sigma, labels)  # the forced normalisation happens before each use
    for name, p in net.named_parameters():
        if name.endswith("weight"):
            torch.testing.assert_close(p.detach().reshape(len(p), -1).square().mean(1), torch.ones(len(p)),
                                       rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda D: D(torch.randn(2, 4, 8, 8), torch.ones(2), torch.tensor([0, 1])), r"x of shape \(B, 3, 8,"),
        (lambda D: D(torch.randn(2, 3, 8, 8), torch.ones(3), torch.tensor([0, 1])), r"sigma of shape \(B,\)"),
        (lambda D: D(torch.randn(2, 3, 8, 8), torch.ones(2)), r"conditional \(label_dim=3\)"),
        (lambda D: D(torch.randn(2, 3, 8, 8), torch.ones(2), torch.tensor([0, 3])), r"must lie in \[0, 3\)"),
        (lambda D: D(torch.randn(2, 3, 8, 8), torch.ones(2), torch.ones(2, 4)), r"got \(2, 4\)"),
        (lambda D: D.unet(torch.randn(2, 3, 7, 7), torch.ones(2), torch.ones(2, 3)), r"divisible by 2"),
        (lambda D: D.unet(torch.randn(2, 3, 8, 8), torch.ones(2), None), r"class_labels of shape \(2, 3\)"),
    ],
)
def test_garbage_inputs_give_one_clear_error(call, match):
    with pytest.raises(ShapeError, match=match) as err:
        call(tiny(3))
    assert one_line(err)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(img_resolution=6, channel_mult=[1, 2, 2]), "must be divisible by 2"),
        (dict(model_channels=0), "model_channels must be >= 1"),
        (dict(channel_mult=[]), "channel_mult must be positive"),
        (dict(sigma_data=0.0), "sigma_data must be > 0"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny(0, **kw)
    assert one_line(err)


def test_raw_unet_behind_edm_precond():
    from dmdcopy.precond import EDMPrecond

    unet = EDM2UNet(8, 3, 2, model_channels=16, channel_mult=[1, 2], num_blocks=1, channels_per_head=8)
    D = EDMPrecond(unet)
    assert (D.label_dim, D.sample_shape) == (2, (3, 8, 8))
    assert D(torch.randn(2, 3, 8, 8), torch.ones(2), torch.tensor([0, 1])).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- EDM2 snapshots


# EDM2 pickles with EDM's persistence records: the stand-ins and the module fixture are EDM's
# (tests/test_edm_pickle.py).
_EDM2_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet", "Block": "Block", "MPConv": "MPConv",
               "MPFourier": "MPFourier"}


class EDM2Pickler(pickle.Pickler):
    """Writes dmdcopy's EDM2 modules as EDM2's persistent-class records; running ``module_src``
    would create ``marker``."""

    def __init__(self, file, marker, rename=None, extra_kwargs=None):
        super().__init__(file, protocol=4)
        self.module_src = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        self.rename, self.extra_kwargs = rename or {}, extra_kwargs or {}

    def record(self, class_name, state):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name, state=state)
        return _reconstruct_persistent_obj, (meta,)

    def reducer_override(self, obj):
        if isinstance(obj, types.SimpleNamespace):  # EDM2Loss, StandardRGBEncoder: persistent, not modules
            return self.record(obj.name, {**vars(obj), "_init_args": (), "_init_kwargs": {}})
        if not (isinstance(obj, nn.Module) and type(obj).__module__ == "dmdcopy.nets.edm2"):
            return NotImplemented
        name = type(obj).__name__
        state = dict(obj.__dict__)
        kwargs = {}
        if isinstance(obj, EDM2Precond):  # as EDM2's training loop builds it: options by keyword
            ours = obj.init_kwargs
            kwargs = {k: ours[k] for k in ("img_resolution", "img_channels", "label_dim", "use_fp16",
                                           "model_channels", "channel_mult", "attn_resolutions",
                                           "num_blocks", "channels_per_head", "logvar_channels", "dropout")}
            kwargs |= self.extra_kwargs
            state = {k: v for k, v in state.items() if k not in ("sample_shape", "sigma_min", "sigma_max")}
        state |= {"_init_args": (), "_init_kwargs": kwargs}
        return self.record(self.rename.get(name, _EDM2_NAMES[name]), state)


def write_edm2_snapshot(path, net, marker, **kw):
    data = EasyDict(
        encoder=types.SimpleNamespace(name="StandardRGBEncoder"),
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip"),
        loss_fn=types.SimpleNamespace(name="EDM2Loss", P_mean=-0.8, P_std=1.6, sigma_data=0.5),
    )
    data["ema"] = net.half().eval().requires_grad_(False)  # EDM2 snapshots hold float16 weights
    with open(path, "wb") as f:
        EDM2Pickler(f, marker, **kw).dump(data)


@pytest.mark.parametrize("label_dim", [0, 4])
def test_edm2_snapshot_imports_to_identical_outputs(tmp_path, edm_modules, monkeypatch, label_dim):  # noqa: F811
    net = randomise(tiny(label_dim, dropout=0.1))
    marker = tmp_path / "executed"
    write_edm2_snapshot(tmp_path / "network-snapshot.pkl", net, marker)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name)  # the reader needs nothing of EDM2 (nor imports it)
    want_net = net.float()  # the float16 weights, held in float32 (EDM2 computes in float32 on CPU)
    got = load(tmp_path / "network-snapshot.pkl")
    assert not marker.exists()
    edm2_code = [n for n in sys.modules if n.split(".")[0] in ("torch_utils", "dnnlib", "training")]
    assert not edm2_code
    assert type(got) is EDM2Precond and not got.training and got.init_kwargs == want_net.init_kwargs
    assert all(p.dtype is torch.float32 for p in got.parameters())
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.05, 1.0, 20.0])
    labels = torch.tensor([0, 3, 1]) if label_dim else None
    with torch.no_grad():
        torch.testing.assert_close(got(x, sigma, labels, return_logvar=True),
                                   want_net(x, sigma, labels, return_logvar=True), rtol=0, atol=0)
    convert(tmp_path / "network-snapshot.pkl", tmp_path / "converted.safetensors")  # dmdcopy convert
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "converted.safetensors")(x, sigma, labels),
                                   want_net(x, sigma, labels), rtol=0, atol=0)
    record = read_edm_pickle(tmp_path / "network-snapshot.pkl")
    assert record.class_name == "Precond" and record.children["unet"].class_name == "UNet"
    assert record.state_dict().keys() == net.state_dict().keys()


def test_edm2_snapshot_with_unknown_parts_gives_one_clear_error(tmp_path, edm_modules):  # noqa: F811
    net = tiny(0)
    write_edm2_snapshot(tmp_path / "a.pkl", net, tmp_path / "x", rename={"EDM2UNet": "UNet3"})
    write_edm2_snapshot(tmp_path / "b.pkl", net, tmp_path / "x", extra_kwargs={"fused_attention": True})
    write_edm2_snapshot(tmp_path / "c.pkl", net, tmp_path / "x", rename={"EDM2Precond": "EDM3Precond"})
    write_edm2_snapshot(tmp_path / "d.pkl", net, tmp_path / "x", extra_kwargs={"model_channels": 24})
    cases = [
        ("a.pkl", r"EDM2's Precond.unet is UNet3; dmdcopy rebuilds EDM2's UNet"),
        ("b.pkl", r"records options \['fused_attention'\] that dmdcopy's EDM2Precond does not take"),
        ("c.pkl", r"an EDM EDM3Precond; dmdcopy rebuilds EDMPrecond, .* and Precond \(EDM2\)"),
        ("d.pkl", r"does not fit|mismatched|shape"),
    ]
    for name, match in cases:
        with pytest.raises(CheckpointError, match=match) as err:
            load_edm_pickle(tmp_path / name)
        assert one_line(err) or name == "d.pkl"  # a shape mismatch lists every key, one per line
    write_edm2_snapshot(tmp_path / "f.pkl", tiny(0), tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"float32 or float16, not torch\.bfloat16") as err:
        load_edm_pickle(tmp_path / "f.pkl", net_dtype=torch.bfloat16)
    assert one_line(err)
    assert not (tmp_path / "x").exists()


def test_a_scratch_student_of_an_edm2_teacher_is_a_fresh_seeded_edm2_denoiser():
    from dmdcopy.experiments.pipeline import make_student

    teacher = tiny().eval().requires_grad_(False)
    a, b = make_student(teacher, "scratch", seed=3), make_student(teacher, "scratch", seed=3)
    c = make_student(teacher, "scratch", seed=4)
    assert type(a.denoiser) is EDM2Precond and a.denoiser.init_kwargs == teacher.init_kwargs
    pa, pb, pc = ([p.detach().flatten() for p in s.parameters()] for s in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))
    assert all(p.requires_grad for p in a.parameters())
