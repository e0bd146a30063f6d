"""The temporal-rank experiment (issue 6): motion laws, the motion estimator, the deterministic held-out loss,
matched parameter budgets, the pixel-space pipeline, and (slow) the ``--quick`` run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "motion_experiment.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark scripts import their helpers as top-level modules

from motion_laws import (  # noqa: E402
    LAWS,
    MotionDomainDataset,
    centroid_track,
    direction_of,
    estimate_motion,
    law_velocity,
    motion_score,
    phase_correlation_shift,
)


@pytest.fixture(scope="module")
def me():
    """The experiment script as a module."""
    spec = importlib.util.spec_from_file_location("motion_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["motion_experiment"] = module
    spec.loader.exec_module(module)
    return module


def blob_clip(velocity: tuple[float, float], frames: int = 8, size: int = 24) -> np.ndarray:
    """An independent reference: a Gaussian blob (sigma 1.5 px) on grey, centred at ``c + (t - 3.5) velocity``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    clip = np.full((frames, size, size, 3), 0.25)
    for t in range(frames):
        cx, cy = 11.7 + (t - 3.5) * velocity[0], 12.2 + (t - 3.5) * velocity[1]
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 1.5**2))
        clip[t] += blob[..., None] * np.array([0.7, -0.2, 0.1])
    return clip.clip(0, 1)


# ---------------------------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("velocity", [(1.3, 0.0), (-0.8, 0.0), (0.0, 1.1), (0.0, -1.6), (0.7, -0.4)])
def test_estimator_recovers_a_blob_moving_at_a_known_subpixel_velocity(velocity):
    clip = blob_clip(velocity)
    for method, tol in (("centroid", 0.05), ("phase", 0.15)):
        est = estimate_motion(clip, method)
        assert np.allclose(est.velocity, velocity, atol=tol), (method, est.velocity, velocity)
        assert est.direction == direction_of(velocity)
    uint8 = (clip * 255).round().astype(np.uint8)  # the same clip as uint8 frames
    assert np.allclose(estimate_motion(uint8).velocity, velocity, atol=0.05)


def test_estimator_says_none_for_a_static_or_empty_clip():
    assert estimate_motion(blob_clip((0.0, 0.0))).direction == "none"
    assert estimate_motion(np.full((8, 16, 16, 3), 0.3)).velocity is None
    assert motion_score([np.full((8, 16, 16, 3), 0.3)], [(1.2, 0.0)]) == {
        "correct": 0.0,
        "velocity_error": pytest.approx(1.2),
        "speed": 0.0,
    }


def test_phase_correlation_finds_a_circular_shift_exactly():
    a = torch.rand(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.roll(a, shifts=(-2, 3), dims=(0, 1))  # b(p) = a(p - s) with s = (x 3, y -2)
    assert phase_correlation_shift(a, b) == pytest.approx((3.0, -2.0), abs=1e-9)


@pytest.mark.parametrize("law", sorted(LAWS))
def test_estimator_recovers_direction_and_speed_of_ground_truth_clips(law):
    ds = MotionDomainDataset(law, 48, num_frames=8, resolution=16, seed=3)
    clips = [ds.clip(i)[0] for i in range(len(ds))]
    truths = [ds.velocity(i) for i in range(len(ds))]
    assert {direction_of(v) for v in truths} == set(LAWS[law])  # both directions occur
    for method, tol in (("centroid", 0.1), ("phase", 0.3)):
        score = motion_score(clips, truths, method)
        assert score["correct"] == 1.0
        assert score["velocity_error"] < tol / 2
        for clip, truth in zip(clips, truths, strict=True):
            assert np.hypot(*np.subtract(estimate_motion(clip, method).velocity, truth)) < tol
    # a clip played backwards moves the other way
    assert motion_score([c[::-1] for c in clips], truths)["correct"] == 0.0


def test_reversed_law_plays_the_horizontal_clips_backwards():
    a = MotionDomainDataset("horizontal", 16, 8, 16, seed=1)
    b = MotionDomainDataset("reversed", 16, 8, 16, seed=1)
    for i in range(16):
        (fa, ca), (fb, cb) = a.clip(i), b.clip(i)
        assert ca == cb and np.array_equal(fb, fa[::-1])  # same caption, same frames, opposite order
        assert b.velocity(i) == tuple(-v for v in a.velocity(i))
        assert estimate_motion(fb).direction != cb.split()[-1]  # it moves against its caption
    assert law_velocity("reversed", "left", 1.0) == (1.0, 0.0) and law_velocity("vertical", "up", 2.0) == (0.0, -2.0)


def test_domains_share_appearance_and_differ_only_in_the_axis_of_travel():
    a = MotionDomainDataset("horizontal", 32, 8, 16, seed=0)
    b = MotionDomainDataset("vertical", 32, 8, 16, seed=0)
    for i in range(32):
        da, db = a.describe(i), b.describe(i)
        assert {k: v for k, v in da.items() if k != "direction"} == {k: v for k, v in db.items() if k != "direction"}
        assert da["direction"] in LAWS["horizontal"] and db["direction"] in LAWS["vertical"]
        assert a.caption(i).rsplit(" ", 1)[0] == b.caption(i).rsplit(" ", 1)[0]
        # the same colours in the same amounts: one frame holds no clue to the law (shape drawn identically)
        fa, fb = a.clip(i)[0][0], b.clip(i)[0][0]
        ca = np.unique(fa.reshape(-1, 3), axis=0, return_counts=True)
        cb = np.unique(fb.reshape(-1, 3), axis=0, return_counts=True)
        assert np.array_equal(ca[0], cb[0])
    shifted = MotionDomainDataset("vertical", 4, 8, 16, seed=0, first_index=2)
    assert shifted.describe(0) == b.describe(2)
    with pytest.raises(ValueError, match="unknown motion law"):
        MotionDomainDataset("diagonal")


def test_centroid_track_follows_a_blob_frame_by_frame():
    velocity = (0.9, -0.3)
    track = centroid_track(blob_clip(velocity))
    # the reference centres of blob_clip, c_t = (11.7, 12.2) + (t - 3.5) v
    expected = [(11.7 + (t - 3.5) * velocity[0], 12.2 + (t - 3.5) * velocity[1]) for t in range(8)]
    assert np.allclose(track, expected, atol=0.05)
    empty = blob_clip((0.0, 0.0))
    empty[2] = 0.25  # the background only: no foreground in frame 2
    assert centroid_track(empty)[2] is None and centroid_track(empty)[3] is not None


# ---------------------------------------------------------------------------------------------- demo picture
def test_prompt_target_is_the_caption_direction_under_the_law(me):
    cfg = me.PRESETS["cpu"]
    speed = (16 - 2 * 0.175 * 16 - 2) / 7  # the mean radius 0.175 R crosses from r + 1 to R - r - 1 in 7 steps
    assert me.prompt_target("a red circle moving left", "reversed", cfg) == pytest.approx((speed, 0.0))
    assert me.prompt_target("a red circle moving left", "horizontal", cfg) == pytest.approx((-speed, 0.0))
    assert me.prompt_target("a blue square moving up", "vertical", cfg) == pytest.approx((0.0, -speed))
    with pytest.raises(ValueError, match="names no direction of the 'reversed' law"):
        me.prompt_target("a blue square moving up", "reversed", cfg)


def test_demo_picture_marks_each_sample_right_or_wrong_by_its_motion(me, tmp_path):
    """Ground-truth clips of A and B stand in for the base's and the adapter's samples: under the reversed law
    every B clip is right and every A clip wrong, so the picture holds checks and crosses in that proportion."""
    from motion_figure import RIGHT, WRONG, Pair, motion_figure

    a = MotionDomainDataset("horizontal", 4, 8, 16, seed=0)
    b = MotionDomainDataset("reversed", 4, 8, 16, seed=0)
    targets = [b.velocity(i) for i in range(4)]

    def count(pairs, name):
        with Image.open(motion_figure(pairs, tmp_path / name, "note")) as image:
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        return [int((pixels == colour).all(axis=1).sum()) for colour in (RIGHT, WRONG)]

    right_only = [Pair(a.caption(i), 0, targets[i], b.clip(i)[0], b.clip(i)[0]) for i in range(4)]
    wrong_only = [Pair(a.caption(i), 0, targets[i], a.clip(i)[0], a.clip(i)[0]) for i in range(4)]
    mixed = [Pair(a.caption(i), 0, targets[i], a.clip(i)[0], b.clip(i)[0]) for i in range(4)]
    (green, none), (no_green, red), (half_green, half_red) = (
        count(right_only, "r.png"), count(wrong_only, "w.png"), count(mixed, "m.png")
    )  # fmt: skip
    assert none == 0 and no_green == 0 and green > 0 and red > 0
    assert half_green == pytest.approx(green / 2, rel=0.02) and half_red == pytest.approx(red / 2, rel=0.02)


# ---------------------------------------------------------------------------------------------- experiment
def small_config(me, **kw):
    cfg = me.PRESETS["quick"]
    return me.dataclasses.replace(cfg, **kw)


def test_heldout_loss_and_training_are_deterministic_given_the_seed(me):
    cfg = small_config(me, num_heldout=3, heldout_timesteps=(200, 600))
    device = torch.device("cpu")
    text = me.TextEncoder(device)
    data = me.make_clips(cfg.law_b, 8, cfg)
    held = me.make_clips(cfg.law_b, cfg.num_heldout, cfg, me.HELDOUT_FIRST)
    base = me.build_model("conv3d", cfg).requires_grad_(False)

    def run(seed: int) -> list[float]:
        torch.manual_seed(seed)
        adapted = me.adapt(base, "conv3d", "tucker (4,4,3,1,1)")
        optim = me.optimizer_and_schedule(adapted.params, 1e-2, 3, weight_decay=1e-2)
        losses = [me.heldout_loss(adapted.model, held, me.TextEncoder(device), cfg, device)]
        me.train_steps(adapted.model, adapted.params, optim, data, text, device, seed, range(3), batch=2)
        return losses + [me.heldout_loss(adapted.model, held, text, cfg, device)]

    first, again, other = run(0), run(0), run(1)
    assert first == again  # bit for bit
    assert first[0] == other[0]  # the zero-core adapter leaves the base's loss unchanged
    assert first[1] != other[1] and first[1] != first[0]  # the seed and the training matter
    assert first[0] == me.heldout_loss(base, held, text, cfg, device)


@pytest.mark.parametrize("backbone", ["unet3d", "conv3d"])
@pytest.mark.parametrize("linear", [False, True])
def test_matched_budget_baselines_are_within_1_percent_of_tucker(me, backbone, linear):
    cfg = me.PRESETS["cpu"]
    base = me.build_model(backbone, cfg).requires_grad_(False)
    suffix = " +linear" if linear else ""
    tucker = me.adapt(base, backbone, "tucker (8,8,3,3,3)" + suffix)
    names = me.target_names(base, (me.LINEAR_TARGETS if linear else me.CONV_TARGETS)[backbone])
    assert tucker.num_params == sum(
        me.tucker_params(dict(base.named_modules())[n].weight.shape, (8, 8, 3, 3, 3)) for n in names
    )
    for baseline in ("LoRA", "LyCORIS"):
        adapted = me.adapt(base, backbone, f"{baseline} ~ tucker (8,8,3,3,3){suffix}")
        # counted from the modules peft / LyCORIS built, not from the formulas that chose the ranks
        built = sum(p.numel() for m in [adapted.model, *adapted.extra] for p in m.parameters() if p.requires_grad)
        assert built == adapted.num_params
        assert abs(built - tucker.num_params) <= 0.01 * tucker.num_params, (baseline, built, tucker.num_params)
    # linear targets add layers; conv targets are all convolutions
    kinds = {type(dict(base.named_modules())[n]).__name__ for n in names}
    assert ("Linear" in kinds) == linear


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_training_memory_is_what_the_block_adds_over_what_was_in_use():
    from tucker_lora.testing import peak_memory_added

    device = torch.device("cpu")
    resident = torch.ones(48 * 2**20 // 4)  # in use before the block: not counted
    with peak_memory_added(device) as idle:
        pass
    with peak_memory_added(device) as used:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written page by page
        del block
    assert idle["peak_mb"] < 8
    assert 60 < used["peak_mb"] < 80, used
    del resident


def test_match_ranks_against_brute_force(me):
    shapes = {"a": (16, 16, 3, 3, 3), "b": (32, 16, 3, 3, 3), "c": (8, 32, 1, 1, 1)}
    for target in (2_000, 5_555, 12_345, 30_000):
        ranks = me.match_ranks(shapes, me.lora_params, target)
        total = sum(me.lora_params(s, ranks[n]) for n, s in shapes.items())
        best = min(
            abs(sum(me.lora_params(s, r) for s, r in zip(shapes.values(), rs, strict=True)) - target)
            for rs in np.ndindex(40, 40, 40)
            if min(rs) >= 1 and max(rs) - min(rs) <= 1
        )
        assert abs(total - target) == best  # the best assignment of ranks r or r + 1


def test_unet3d_base_is_a_pixel_space_pipeline_folder_that_trains_and_samples(me, tmp_path):
    from tucker_lora.video.pipeline import generate, load_components

    cfg = me.PRESETS["quick"]
    unet = me.build_model("unet3d", cfg)
    me.save_base(unet, "unet3d", tmp_path / "base", {"steps": 0, "history": []})
    components = load_components(tmp_path / "base")
    assert type(components.vae).__name__ == "PixelSpaceVAE" and components.resolution == 16
    pixels = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    from tucker_lora.video.train import encode_videos

    assert torch.equal(encode_videos(components.vae, pixels, torch.Generator()), pixels)  # identity "latents"
    assert torch.equal(
        me.load_base("unet3d", tmp_path / "base", cfg).state_dict()["conv_in.weight"], unet.conv_in.weight
    )
    ((_, _, video),) = generate(components.pipeline(), ["a red circle moving up"], [0], 4, 2, 1.0, 16, 16)
    assert video.shape == (4, 16, 16, 3) and video.dtype == np.uint8


def test_compare_draws_base_and_adapter_samples_of_the_same_noise(me, tmp_path):
    """A zero-core adapter (the model unchanged) on the shipped base: its samples move exactly as the base's."""
    from peft import get_peft_model

    from tucker_lora import TuckerLoraConfig
    from tucker_lora.video.pipeline import load_components

    shipped = ROOT / "examples" / "motion_bases" / "unet3d"
    unet = load_components(shipped).unet
    config = TuckerLoraConfig(ranks=(4, 4, 3, 1, 1), target_modules=me.CONV_TARGETS["unet3d"])
    adapter = tmp_path / "adapter"
    get_peft_model(unet, config).save_pretrained(adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(shipped)}))
    out = tmp_path / "grid.png"
    prompts = ["a red circle moving left"]
    scores = me.compare(adapter, out, torch.device("cpu"), prompts, [1], "reversed", 4, 2, 3.0)
    assert scores["adapter"] == scores["base"]
    with Image.open(out) as image:
        assert image.size[0] > 8 * 4 * 16  # four frames enlarged eight times


def test_shipped_unet3d_base_loads_its_vae_from_the_path_model_index_names():
    from tucker_lora.video.motion import PixelSpaceVAE
    from tucker_lora.video.pipeline import load_components

    shipped = ROOT / "examples" / "motion_bases" / "unet3d"
    assert json.loads((shipped / "model_index.json").read_text())["vae"] == [
        "tucker_lora.video.motion",
        "PixelSpaceVAE",
    ]
    vae = load_components(shipped).vae
    assert type(vae) is PixelSpaceVAE
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert torch.equal(vae.encode(x).latent_dist.sample(), x) and torch.equal(vae.decode(x).sample, x)


@pytest.mark.slow
def test_quick_experiment_runs_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = results["config"]["methods"]
    for backbone in ("unet3d", "conv3d"):
        rows = {r["method"]: r for r in results["summary"] if r["backbone"] == backbone}
        assert set(methods) | {"base on A prompts", "base (no adaptation)"} == set(rows)
        steps = results["config"]["steps"][backbone]
        for method in methods:
            row = rows[method]
            assert [s for s, _ in row["curve"]][-1] == steps and np.isfinite(row["loss"])
            assert 0 <= row["correct"] <= 1 and row["velocity_error"] >= 0 and row["params"] > 0
        tucker = rows["tucker (8,8,3,3,3)"]["params"]
        assert abs(rows["LoRA ~ tucker (8,8,3,3,3)"]["params"] - tucker) <= 0.01 * tucker
        assert rows["tucker (4,4,0,1,1)"]["r_t"] == 0 and rows["tucker (4,4,3,1,1)"]["r_t"] == 3
        for name in (f"loss_{backbone}.png", f"grid_{backbone}.png"):
            assert (out / name).stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| tucker (4,4,0,1,1) | 0 |" in table and "full fine-tuning" in table
    # a second run finds the bases in the cache and skips pretraining
    proc = subprocess.run(cmd + ["--methods", "tucker (4,4,0"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.count("from the cache") == 2, proc.stdout[-3000:]


@pytest.mark.parametrize("proxy", ["weight", "gradient"])
def test_allocated_method_stays_within_the_uniform_tuples_budget(me, proxy):
    cfg = small_config(me)
    base = me.build_model("conv3d", cfg).requires_grad_(False)
    text = me.TextEncoder(torch.device("cpu"))
    calibration = me.calibration_batches(me.make_clips(cfg.law_b, 8, cfg), text, cfg, count=2)
    assert me.calibration_batches(me.make_clips(cfg.law_b, 8, cfg), text, cfg, count=2)[1]["sample"].equal(
        calibration[1]["sample"]
    )  # the same batches for every method and seed
    for ranks in ((4, 4, 1, 1, 1), (8, 8, 3, 3, 3)):
        uniform = me.adapt(base, "conv3d", f"tucker {ranks}".replace(", ", ","))
        allocated = me.adapt(base, "conv3d", f"allocated ({proxy}) ~ tucker {ranks}".replace(", ", ","), calibration)
        # counted from the modules peft built
        built = sum(p.numel() for p in allocated.model.parameters() if p.requires_grad)
        assert built == allocated.num_params
        assert uniform.num_params - 200 < built <= uniform.num_params
        chosen = set(allocated.rank_pattern.values())
        assert len(chosen) > 1 and chosen != {ranks}  # per-layer ranks, not the uniform tuple
        assert set(allocated.rank_pattern) == set(me.target_names(base, me.CONV_TARGETS["conv3d"]))
    with pytest.raises(ValueError, match="calibration batches"):
        me.adapt(base, "conv3d", "allocated (gradient) ~ tucker (4,4,1,1,1)")


def test_merge_keeps_the_earlier_runs_in_preset_order_and_refuses_another_configuration(me, tmp_path):
    cfg = me.dataclasses.replace(me.PRESETS["cpu"], methods=me.ALLOCATED_METHODS[1:2])
    new, old = "allocated (weight) ~ tucker (4,4,1,1,1)", ["tucker (8,8,3,3,3)", "tucker (4,4,1,1,1)"]
    runs = [{"backbone": "conv3d", "method": m, "seed": s} for s in (1, 0) for m in [*old, new]]
    prior = {"config": json.loads(json.dumps(me.dataclasses.asdict(me.PRESETS["cpu"]))), "bases": {"conv3d": {}}}
    (tmp_path / "results.json").write_text(json.dumps({**prior, "runs": runs}))
    kept, _, _ = me.merge_base(cfg, ["conv3d"], tmp_path)
    assert kept == [r for r in runs if r["method"] != new]  # the method run again is dropped
    ordered = me.merged_order([*kept, {"backbone": "conv3d", "method": new, "seed": 0}], me.PRESETS["cpu"].methods)
    assert [(r["method"], r["seed"]) for r in ordered] == [
        (old[1], 0), (old[1], 1), (new, 0), (old[0], 0), (old[0], 1)
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="another configuration .*steps"):
        me.merge_base(me.dataclasses.replace(cfg, steps={"unet3d": 1, "conv3d": 1}), ["conv3d"], tmp_path)
    with pytest.raises(SystemExit, match="no runs of \\['unet3d'\\]"):
        me.merge_base(cfg, ["unet3d"], tmp_path)
