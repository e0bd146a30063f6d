"""Evaluation under the paper's protocol: the Frechet distance against independent computations and
closed forms, reference statistics, frame sampling, the I3D loaders, the whole command end to end on tiny
videos (a random TorchScript I3D-shaped net, a tiny random CLIP), the cache round trip, efficiency and
time-to-target, and bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

av = pytest.importorskip("av")
pytest.importorskip("transformers")

from tucker_lora.errors import InputError  # noqa: E402
from tucker_lora.eval.cli import cli, main  # noqa: E402
from tucker_lora.eval.efficiency import (  # noqa: E402
    time_saved,
    time_to_target,
    trainable_parameters,
    training_efficiency,
)
from tucker_lora.eval.frechet import frechet_distance, gaussian_fit  # noqa: E402
from tucker_lora.eval.i3d import load_i3d  # noqa: E402
from tucker_lora.eval.inception_i3d import InceptionI3d  # noqa: E402
from tucker_lora.eval.stats import FeatureStats, SettingsMismatchError, load_stats  # noqa: E402
from tucker_lora.eval.videos import frame_indices, read_video, to_detector_input  # noqa: E402
from tucker_lora.video.media import write_video  # noqa: E402

FEATURES = 4  # the tiny detector's feature size: fewer than the videos, so the covariances have full rank
SIZE = 32  # frame size of the test videos (and --resolution, so no resizing: the test can redo the input exactly)


# ---------------------------------------------------------------------------------------------- references
def scipy_frechet(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """The textbook formula with scipy's general matrix square root (as pytorch-fid / StyleGAN-V compute it)."""
    covmean = scipy.linalg.sqrtm(sigma_1 @ sigma_2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1 + sigma_2 - 2 * np.real(covmean)))


def random_cov(rng: np.random.Generator, d: int, n: int = 200) -> np.ndarray:
    return np.atleast_2d(np.cov(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)), rowvar=False))


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def clip_input(path: Path, num_frames: int) -> torch.Tensor:
    """What the detector must receive for a SIZE x SIZE video at --resolution SIZE, computed here: centre-sampled
    frames (floor((k + 1/2) T / N)) scaled to [-1, 1], as (3, N, SIZE, SIZE)."""
    frames = decode_all(path)
    t = len(frames)
    kept = np.stack([frames[math.floor((k + 0.5) * t / num_frames)] for k in range(num_frames)])
    return torch.from_numpy(kept).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)


# ---------------------------------------------------------------------------------------------- Frechet distance
def test_frechet_matches_scipy_sqrtm_on_well_conditioned_covariances():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8, 32):
        mu_1, mu_2 = rng.standard_normal(d), rng.standard_normal(d)
        s_1, s_2 = random_cov(rng, d), random_cov(rng, d)
        expected = scipy_frechet(mu_1, s_1, mu_2, s_2)
        assert frechet_distance(mu_1, s_1, mu_2, s_2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_closed_forms():
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(16), random_cov(rng, 16)
    scale = np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * scale  # identical Gaussians: 0
    shift = rng.standard_normal(16)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift @ shift), rel=1e-8)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)  # commuting (diagonal) covariances
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0
    )


def test_frechet_near_singular_covariances_are_finite_and_exact():
    """Fewer samples than features (rank-deficient covariances), both in one k-dim subspace of R^D: the distance
    equals the one computed in the subspace's own coordinates, where the covariances are well conditioned."""
    rng = np.random.default_rng(2)
    d, k, n = 64, 6, 20
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))  # orthonormal basis of the subspace
    z_1 = rng.standard_normal((n, k)) @ rng.standard_normal((k, k))
    z_2 = rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) + 0.5
    mu_1, s_1 = gaussian_fit(z_1 @ q.T)
    mu_2, s_2 = gaussian_fit(z_2 @ q.T)
    assert np.linalg.matrix_rank(s_1) == k < d
    expected = scipy_frechet(z_1.mean(0), np.cov(z_1, rowvar=False), z_2.mean(0), np.cov(z_2, rowvar=False))
    got = frechet_distance(mu_1, s_1, mu_2, s_2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-8)
    # covariances with eigenvalues spanning 1e-12..1 (condition number 1e12), rotated: the diagonal closed form
    a, b = np.logspace(-12, 0, d), np.logspace(0, -12, d)
    expected = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got = frechet_distance(np.zeros(d), rot @ np.diag(a) @ rot.T, np.zeros(d), rot @ np.diag(b) @ rot.T)
    assert got == pytest.approx(expected, rel=1e-8)
    # singular and identical: 0, not a negative rounding error or NaN
    assert frechet_distance(mu_1, s_1, mu_1, s_1) == pytest.approx(0.0, abs=1e-9 * np.trace(s_1))


def test_gaussian_fit_and_shape_errors():
    f = np.random.default_rng(3).standard_normal((10, 5))
    mu, sigma = gaussian_fit(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_fit(f[:1])
    with pytest.raises(ValueError, match="sigma_2"):
        frechet_distance(mu, sigma, mu, sigma[:4, :4])


# ---------------------------------------------------------------------------------------------- statistics
def test_stats_round_trip_and_settings_mismatch(tmp_path):
    f = np.random.default_rng(4).standard_normal((12, 3))
    settings = {"num_frames": 16, "resolution": 224, "value_range": (-1, 1), "detector_sha256": "ab"}
    path = FeatureStats.from_features(f, settings, source="x").save(tmp_path / "ref.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left behind
    stats = load_stats(path, settings)
    np.testing.assert_allclose(stats.mu, f.mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False))
    assert stats.count == 12 and stats.source == "x"
    with pytest.raises(SettingsMismatchError, match=r"ref\.npz.*resolution=224.*resolution=128"):
        load_stats(path, {**settings, "resolution": 128})
    with pytest.raises(SettingsMismatchError, match="frame_sampling"):
        load_stats(path, {**settings, "frame_sampling": "centre"})
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match=r"bad\.npz.*cannot be read"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(InputError, match=r"missing\.npz.*does not exist"):
        load_stats(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------- videos
def coded_video(num_frames: int, size: int = SIZE) -> np.ndarray:
    """Grey level 8 + 12 k on frame k, so a decoded frame tells its index."""
    levels = (8 + 12 * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, size, size, 3)).copy()


def test_frame_indices_and_centre_sampling(tmp_path):
    for total, n in ((16, 16), (20, 16), (49, 16), (17, 4)):
        expected = [math.floor((k + 0.5) * total / n) for k in range(n)]
        assert frame_indices(total, n).tolist() == expected
    assert frame_indices(20, 16, "first").tolist() == list(range(16))
    path = write_video(coded_video(20), tmp_path / "v.mp4")
    frames = read_video(path, 16)
    assert frames.shape == (16, SIZE, SIZE, 3) and frames.dtype == np.uint8
    got = [round((float(f.mean()) - 8) / 12) for f in frames]
    assert got == [math.floor((k + 0.5) * 20 / 16) for k in range(16)]
    assert [round((float(f.mean()) - 8) / 12) for f in read_video(path, 16, "first")] == list(range(16))


def test_detector_input_crop_and_range():
    frames = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8))
    x = to_detector_input(frames, 16)  # shorter side already 16: only the centre crop, columns 4..19
    assert x.shape == (3, 3, 16, 16)
    expected = frames[:, :, 4:20].float().div(127.5).sub(1).permute(3, 0, 1, 2)
    torch.testing.assert_close(x, expected)
    y = to_detector_input(torch.full((2, 40, 30, 3), 51, dtype=torch.uint8), 8)  # resized, constant stays constant
    assert y.shape == (3, 2, 8, 8)
    torch.testing.assert_close(y, torch.full_like(y, 51 / 127.5 - 1))


# ---------------------------------------------------------------------------------------------- detectors
class TinyI3D(nn.Module):
    """I3D-shaped: (B, 3, T, H, W) -> Conv3d stack -> pooled to 2 x 2 x 2 -> features; StyleGAN-V's keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, FEATURES)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale:
            x = 2 * x - 1
        h = nn.functional.adaptive_avg_pool3d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        f = 10.0 * self.fc(h.flatten(1))
        return f if return_features else torch.softmax(f, dim=-1)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = TinyI3D().eval()
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; the published I3D detectors use it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(path))
    return path, net


def random_inception_i3d(num_classes: int = 400) -> InceptionI3d:
    """A random ``InceptionI3d`` built on the meta device and filled in place (much faster than its default init)."""
    with torch.device("meta"):
        net = InceptionI3d(num_classes)
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("conv3d.weight"):
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            elif name.endswith(("running_var", "bn.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 - 0.1)
    return net.eval()


def test_inception_i3d_layout_and_pooling():
    """Module names and shapes of the PyTorch I3D port's state dict, and at 16 x 224 x 224 the global average
    equals the port's AvgPool3d((2, 7, 7)) over the Mixed_5c map followed by the squeeze over time."""
    with torch.device("meta"):
        net = InceptionI3d()
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert net.trunk(torch.empty(1, 3, 16, 224, 224)).shape == (1, 1024, 2, 7, 7)
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Conv3d_1a_7x7.bn.running_var"] == (64,)
    assert shapes["Mixed_4e.b1b.conv3d.weight"] == (288, 144, 3, 3, 3)
    assert shapes["Mixed_5c.b3b.conv3d.weight"] == (128, 832, 1, 1, 1)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1) and shapes["logits.conv3d.bias"] == (400,)
    assert "Conv3d_1a_7x7.conv3d.bias" not in shapes and len(shapes) == 344
    torch.manual_seed(0)
    net.logits.to_empty(device="cpu")
    nn.init.normal_(net.logits.conv3d.weight)
    nn.init.normal_(net.logits.conv3d.bias)
    m = torch.randn(2, 1024, 2, 7, 7)
    with torch.no_grad():
        expected = net.logits.conv3d(nn.AvgPool3d((2, 7, 7), stride=1)(m)).squeeze(3).squeeze(3).squeeze(-1)
        torch.testing.assert_close(net.head(m), expected, rtol=1e-4, atol=1e-4)


def test_load_i3d_state_dict_and_torchscript(tmp_path, tiny_i3d):
    net = random_inception_i3d(num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "rgb.pt")
    detector = load_i3d(tmp_path / "rgb.pt")
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net(x).double().numpy()
    np.testing.assert_allclose(detector(x), expected, rtol=1e-5, atol=1e-6)
    assert detector.kind == "inception_i3d" and len(detector.sha256) == 64

    path, tiny = tiny_i3d
    scripted = load_i3d(path)
    assert scripted.kwargs == {"rescale": False, "resize": False, "return_features": True}
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x), tiny(x, return_features=True).double().numpy(), rtol=1e-5, atol=1e-6)

    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other\.pt.*logits\.conv3d\.weight"):
        load_i3d(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"junk\.pt.*cannot be read"):
        load_i3d(tmp_path / "junk.pt")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel (width 32, 32 x 32 images) with a tokenizer and image processor, saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tucker_lora.video.pipeline import text_config_for, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            **text_config_for(tokenizer),
        ),
        vision_config=dict(
            image_size=SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


def moving_square(seed: int, num_frames: int) -> np.ndarray:
    """A coloured square moving over a noisy background: videos that differ, so features have spread."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 60, (num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    colour, (dy, dx) = rng.integers(100, 256, 3), rng.integers(-1, 2, 2)
    y, x = rng.integers(4, SIZE - 12, 2)
    for t in range(num_frames):
        yy, xx = (y + dy * t) % (SIZE - 8), (x + dx * t) % (SIZE - 8)
        video[t, yy : yy + 8, xx : xx + 8] = colour
    return video


PROMPTS = ["a red circle moving left", "a blue square moving up", "a dog", "a cat on a beach", "rain", "a car"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Six generated videos of 20 frames (resampled to 16) with captions.csv, seven reference videos of 16."""
    root = tmp_path_factory.mktemp("videos")
    gen, ref = root / "generated", root / "reference"
    rows = ["file,caption"]
    for i, prompt in enumerate(PROMPTS):
        write_video(moving_square(i, 20), gen / f"{i:02d}_seed{i}.mp4")
        rows.append(f"{i:02d}_seed{i},{prompt}")
    (gen / "captions.csv").write_text("\n".join(rows) + "\n")
    for i in range(7):
        write_video(moving_square(100 + i, 16), ref / "sub" / f"ref{i}.mp4")
    return gen, ref


def expected_fvd(gen: Path, ref: Path, net: nn.Module) -> float:
    """FVD computed here: own decoding and frame choice, the network called directly, np.cov and scipy's sqrtm."""

    def feats(paths: list[Path]) -> np.ndarray:
        with torch.no_grad():
            return np.stack([net(clip_input(p, 16)[None], return_features=True)[0].double().numpy() for p in paths])

    f_gen, f_ref = feats(sorted(gen.glob("*.mp4"))), feats(sorted(ref.rglob("*.mp4")))
    return scipy_frechet(f_gen.mean(0), np.cov(f_gen, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False))


def expected_clip_t(gen: Path, clip_path: Path) -> list[float]:
    """CLIP-T per video from CLIPModel's own forward: logits_per_text / exp(logit_scale) are the cosines."""
    from transformers import CLIPImageProcessor, CLIPModel

    from tucker_lora.video.pipeline import tiny_tokenizer

    model = CLIPModel.from_pretrained(clip_path).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_path)
    tokenizer = tiny_tokenizer()
    out = []
    for i, prompt in enumerate(PROMPTS):
        frames = (clip_input(gen / f"{i:02d}_seed{i}.mp4", 16) + 1).mul(127.5).round().byte().permute(1, 2, 3, 0)
        pixels = processor(images=list(frames.numpy()), return_tensors="pt").pixel_values
        with torch.no_grad():
            o = model(input_ids=tokenizer([prompt], return_tensors="pt").input_ids, pixel_values=pixels)
            out.append(float((o.logits_per_text / model.logit_scale.exp()).mean()))
    return out


def test_command_end_to_end_with_cache_round_trip(tmp_path, tiny_i3d, tiny_clip, folders, capsys):
    gen, ref = folders
    i3d_path, net = tiny_i3d
    common = [str(gen), "--i3d", str(i3d_path), "--num-frames", "16", "--resolution", str(SIZE), "--batch-size", "4"]
    stats = tmp_path / "cache" / "ref_stats.npz"
    out_json = tmp_path / "scores.json"
    first = main(
        common
        + ["--reference-videos", str(ref), "--reference-stats", str(stats), "--clip", str(tiny_clip)]
        + ["--output", str(out_json)]
    )
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(first))
    printed = capsys.readouterr().out
    assert json.loads(printed)["fvd"] == first["fvd"]
    assert first["num_videos"] == 6 and first["reference"]["num_videos"] == 7
    assert first["reference"]["from_cache"] is False and stats.is_file()
    assert first["fvd"] == pytest.approx(expected_fvd(gen, ref, net), rel=1e-4)
    expected = expected_clip_t(gen, tiny_clip)
    assert first["clip_t"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert list(first["clip_t_per_video"]) == [f"{i:02d}_seed{i}.mp4" for i in range(6)]
    assert list(first["clip_t_per_video"].values()) == pytest.approx(expected, abs=1e-5)
    s = first["settings"]
    assert (s["num_frames"], s["resolution"], s["frame_sampling"], s["value_range"]) == (16, SIZE, "centre", [-1, 1])
    assert s["detector_path"] == str(i3d_path) and s["clip"] == str(tiny_clip) and s["detector"] == "torchscript"
    assert len(s["detector_sha256"]) == 64

    saved = np.load(stats)
    assert saved["mu"].shape == (FEATURES,) and saved["sigma"].shape == (FEATURES, FEATURES) and saved["count"] == 7
    assert json.loads(str(saved["settings"]))["num_frames"] == 16

    # second run: the cache is read, the same FVD; then the .npz alone, without the reference videos
    second = main(common + ["--reference-videos", str(ref), "--reference-stats", str(stats)])
    assert second["reference"]["from_cache"] is True and second["fvd"] == first["fvd"] and second["clip_t"] is None
    third = main(common + ["--reference-stats", str(stats)])
    assert third["fvd"] == first["fvd"]

    # default cache location: one file per protocol inside the reference folder
    fourth = main(common + ["--reference-videos", str(ref)])
    cache = Path(fourth["reference"]["stats"])
    assert cache.parent == ref and cache.name.startswith("fvd_reference_") and fourth["fvd"] == first["fvd"]
    assert main(common + ["--reference-videos", str(ref)])["reference"]["from_cache"] is True

    # resizing path: another resolution runs and gives features of the same size
    small = main(
        [str(gen), "--i3d", str(i3d_path), "--resolution", "16", "--reference-stats", str(tmp_path / "s.npz")]
        + ["--reference-videos", str(ref)]
    )
    assert np.isfinite(small["fvd"]) and np.load(tmp_path / "s.npz")["mu"].shape == (FEATURES,)


def cli_error(argv: list[str], capsys) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


def test_bad_input_gives_clear_errors(tmp_path, tiny_i3d, folders, capsys):
    gen, ref = folders
    i3d_path, _ = tiny_i3d
    base = ["--i3d", str(i3d_path), "--resolution", str(SIZE)]
    stats = tmp_path / "ref.npz"
    assert main([str(gen), *base, "--reference-videos", str(ref), "--reference-stats", str(stats)])["fvd"] >= 0

    err = cli_error([str(gen), "--i3d", str(tmp_path / "nope.pt"), "--reference-stats", str(stats)], capsys)
    assert "error:" in err and "nope.pt" in err and "does not exist" in err
    err = cli_error([str(gen), "--reference-stats", str(stats)], capsys)
    assert "--i3d" in err
    err = cli_error([str(gen), "--i3d", str(i3d_path)], capsys)
    assert "--reference-stats" in err
    err = cli_error([str(gen), *base, "--reference-stats", str(stats), "--num-frames", "8"], capsys)
    assert "ref.npz" in err and "num_frames=16" in err and "num_frames=8" in err
    err = cli_error([str(gen), *base, "--reference-stats", str(stats), "--frame-sampling", "first"], capsys)
    assert "ref.npz" in err and "frame_sampling" in err
    err = cli_error([str(gen), *base, "--reference-stats", str(tmp_path / "absent.npz")], capsys)
    assert "absent.npz" in err

    short = tmp_path / "short"
    write_video(moving_square(0, 20), short / "ok.mp4")
    write_video(moving_square(1, 10), short / "too_short.mp4")
    err = cli_error([str(short), *base, "--reference-stats", str(stats)], capsys)
    assert "too_short.mp4" in err and "10 frames" in err and "16" in err

    broken = tmp_path / "broken"
    write_video(moving_square(0, 20), broken / "ok.mp4")
    (broken / "broken.mp4").write_bytes(b"\x00\x01 definitely not a video" * 10)
    err = cli_error([str(broken), *base, "--reference-stats", str(stats)], capsys)
    assert "broken.mp4" in err and "cannot be" in err

    err = cli_error([str(tmp_path / "nothing_here"), *base, "--reference-stats", str(stats)], capsys)
    assert "nothing_here" in err
    (tmp_path / "empty").mkdir()
    err = cli_error([str(tmp_path / "empty"), *base, "--reference-stats", str(stats)], capsys)
    assert "no video files" in err and "empty" in err
    err = cli_error([str(gen), *base, "--reference-stats", str(stats), "--resolution", "0"], capsys)
    assert "--resolution" in err
    err = cli_error([str(gen)], capsys)
    assert "nothing to evaluate" in err


def test_clip_t_needs_a_prompt_for_every_video(tmp_path, tiny_clip, capsys):
    folder = tmp_path / "v"
    for i in range(2):
        write_video(moving_square(i, 16), folder / f"v{i}.mp4")
    (folder / "captions.csv").write_text("file,caption\nv0.mp4,a dog\n")
    err = cli_error([str(folder), "--clip", str(tiny_clip), "--resolution", str(SIZE)], capsys)
    assert "captions.csv" in err and "v1.mp4" in err
    err = cli_error([str(folder), "--clip", str(tmp_path)], capsys)
    assert str(tmp_path) in err and "config.json" in err


# ---------------------------------------------------------------------------------------------- efficiency
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_efficiency_from_the_log(tmp_path):
    """The keys the training script writes per step; a resumed run restarts its clock at step 3."""
    records = [
        {"step": 1, "epoch": 0, "loss": 1.0, "lr": 0.0, "videos_per_s": 2.0, "peak_memory_mb": 500.0, "time": 0.5},
        {"step": 2, "epoch": 0, "loss": 0.9, "lr": 1e-4, "videos_per_s": 4.0, "peak_memory_mb": 700.0, "time": 1.0},
        {"step": 3, "epoch": 0, "loss": 0.8, "lr": 1e-4, "videos_per_s": 4.0, "peak_memory_mb": 600.0, "time": 0.25},
    ]
    log = write_jsonl(tmp_path / "train_log.jsonl", records)
    with log.open("a") as f:
        f.write('{"step": 4, "torn')  # a crash mid-line is ignored
    eff = training_efficiency(tmp_path)  # the output folder works as well as the file
    assert eff == {"steps": 3, "wall_clock_s": 1.25, "videos_per_s": pytest.approx(3.0), "peak_memory_mb": 700.0}
    write_jsonl(tmp_path / "bad.jsonl", [{"step": 1, "time": 1.0}])
    with pytest.raises(InputError, match=r"bad\.jsonl.*record 1 has no videos_per_s"):
        training_efficiency(tmp_path / "bad.jsonl")


def test_trainable_parameters_from_an_adapter_checkpoint(tmp_path, toy):
    from peft import get_peft_model

    import tucker_lora

    for freeze, name in (((), "plain"), (("i",), "frozen_i")):
        torch.manual_seed(0)
        targets = ["conv3d", "conv2d", "head"]
        cfg = tucker_lora.TuckerLoraConfig(ranks=(3, 2, 1, 2, 0), target_modules=targets, freeze_modes=freeze)
        model = get_peft_model(type(toy)(), cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stored = sum(p.numel() for n, p in model.named_parameters() if "tucker_lora_" in n)
        model.save_pretrained(tmp_path / name)
        assert trainable_parameters(tmp_path / name) == {"trainable_parameters": trainable, "stored_parameters": stored}
    assert trainable_parameters(tmp_path / "frozen_i")["trainable_parameters"] < stored
    with pytest.raises(InputError, match="adapter_model.safetensors"):
        trainable_parameters(tmp_path)


def test_time_to_target_and_time_saved():
    ours = [(300.0, 180.0), (100.0, 400.0), (200.0, 240.0), (400.0, 150.0)]  # any order
    baseline = [(100.0, 500.0), (250.0, 300.0), (500.0, 230.0), (900.0, 190.0)]
    assert time_to_target(ours, 250.0) == 200.0
    assert time_to_target(ours, 240.0) == 200.0  # <= threshold
    assert time_to_target(ours, 100.0) is None
    assert time_saved(ours, baseline, 200.0) == {
        "target_fvd": 200.0,
        "time_s": 300.0,
        "baseline_time_s": 900.0,
        "time_saved_s": 600.0,
        "speedup": 3.0,
    }
    assert time_saved(ours, baseline, 160.0)["time_saved_s"] is None


def test_command_efficiency_and_time_to_target(tmp_path, tiny_i3d, folders, toy, capsys):
    from peft import get_peft_model

    import tucker_lora

    gen, ref = folders
    i3d_path, _ = tiny_i3d
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": s, "loss": 1.0, "lr": 1e-4, "videos_per_s": 5.0, "peak_memory_mb": 100.0 + s, "time": 10.0 * s}
        for s in range(1, 5)
    ]
    write_jsonl(run / "train_log.jsonl", records)
    model = get_peft_model(type(toy)(), tucker_lora.TuckerLoraConfig(target_modules=["conv3d", "head"]))
    model.save_pretrained(run / "adapter")
    fvd_log = tmp_path / "fvd_log.jsonl"
    write_jsonl(fvd_log, [{"step": 1, "time": 10.0, "fvd": 1e9}])
    stats = tmp_path / "ref.npz"
    argv = [str(gen), "--i3d", str(i3d_path), "--resolution", str(SIZE), "--reference-videos", str(ref)]
    argv += [
        "--reference-stats",
        str(stats),
        "--train-log",
        str(run / "train_log.jsonl"),
        "--adapter",
        str(run / "adapter"),
    ]
    result = main(argv + ["--fvd-log", str(fvd_log), "--step", "3", "--target-fvd", "1e8"])
    capsys.readouterr()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["efficiency"] == {
        "steps": 4,
        "wall_clock_s": 40.0,
        "videos_per_s": pytest.approx(5.0),
        "peak_memory_mb": 104.0,
        "trainable_parameters": n_trainable,
        "stored_parameters": n_trainable,
    }
    last = json.loads(fvd_log.read_text().splitlines()[-1])
    assert (last["step"], last["time"], last["fvd"]) == (3, 30.0, result["fvd"])
    assert result["time_to_target"] == {"target_fvd": 1e8, "time_s": 30.0}  # the random FVD is far below 1e8
    base_log = write_jsonl(tmp_path / "baseline.jsonl", [{"time": 90.0, "fvd": 5.0}])
    only = main(["--fvd-log", str(fvd_log), "--target-fvd", "1e8", "--baseline-fvd-log", str(base_log)])
    assert only["time_to_target"]["time_saved_s"] == 60.0 and only["time_to_target"]["speedup"] == 3.0
    assert only["fvd"] is None and only["num_videos"] is None
    err = cli_error([str(gen), "--train-log", str(run), "--fvd-log", str(fvd_log), "--step", "3"], capsys)
    assert "--step" in err
    err = cli_error(argv + ["--fvd-log", str(fvd_log), "--step", "9"], capsys)
    assert "train_log.jsonl" in err and "no step 9" in err
