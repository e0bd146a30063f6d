"""Training and sampling text-to-video with Tucker-LoRA: data readers, media, checkpoints, EMA,
the training script on both backbones, exact resume, two-process DDP, the sampler, and bad input."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
av = pytest.importorskip("av")

from peft import get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tucker_lora.testing import example_inputs  # noqa: E402
from tucker_lora.video import InputError  # noqa: E402
from tucker_lora.video.adapters import lora_num_params, matched_lora_rank, plan_adapter, tucker_num_params  # noqa: E402
from tucker_lora.video.checkpoint import Checkpoints  # noqa: E402
from tucker_lora.video.data import (  # noqa: E402
    MovingShapesDataset,
    folder_dataset,
    load_dataset,
    msrvtt_dataset,
    read_frames,
    to_pixel_values,
)
from tucker_lora.video.ema import AdapterEMA  # noqa: E402
from tucker_lora.video.media import frame_grid, spread_frames, write_video  # noqa: E402
from tucker_lora.video.metrics import read_log  # noqa: E402
from tucker_lora.video.pipeline import load_components, tiny_components, tiny_tokenizer  # noqa: E402
from tucker_lora.video.train import cli as train_cli  # noqa: E402
from tucker_lora.video.train import main as train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_text_to_video.py"
SAMPLE = ROOT / "examples" / "sample_text_to_video.py"
#: A fast run of the training script: tiny default, 4-frame clips, no validation unless asked.
FAST = ["--num_frames", "4", "--num_synthetic_videos", "6", "--validation_steps", "0", "--num_inference_steps", "2"]


def coded_video(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames whose grey level encodes their index (10 + 20 k), so a decoded frame tells which it was."""
    levels = 10 + 20 * np.arange(num_frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 10) / 20))


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# ---------------------------------------------------------------------------------------------- data
def test_read_frames_takes_the_strided_frames_and_crops(tmp_path):
    path = write_video(coded_video(12), tmp_path / "clip.mp4")
    frames = read_frames(path, num_frames=4, stride=3, start=1)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_index(f) for f in frames] == [1, 4, 7, 10]
    pixels = to_pixel_values(frames, 32)
    assert pixels.shape == (3, 4, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    # the centre crop of a landscape frame keeps its middle: a frame with a bright right edge loses it
    wide = np.zeros((1, 32, 64, 3), np.uint8)
    wide[:, :, 56:] = 255
    assert to_pixel_values(wide, 32).max() == -1


def test_folder_dataset_skips_short_unreadable_and_missing_files_with_warnings(tmp_path, caplog):
    write_video(coded_video(10), tmp_path / "good.mp4")
    write_video(coded_video(9)[::-1], tmp_path / "sub" / "good2.gif")
    write_video(coded_video(3), tmp_path / "short.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "captions.csv").write_text(
        "video,caption\ngood.mp4,first clip\ngood.mp4,first clip again\nsub/good2.gif,second clip\n"
        "short.mp4,too short\nbroken.mp4,broken\nmissing.mp4,not there\n"
    )
    with caplog.at_level(logging.WARNING, logger="tucker_lora.video.data"):
        ds = folder_dataset(tmp_path, num_frames=4, frame_stride=2, resolution=16)
    assert len(ds) == 2
    log = caplog.text
    for name in ("short.mp4", "broken.mp4", "missing.mp4"):
        assert name in log
    assert "too short" in log
    item = ds[0]
    assert item["pixel_values"].shape == (3, 4, 16, 16) and item["caption"] in ("first clip", "first clip again")
    # the clip start is drawn from (seed, epoch, index): same epoch, same clip; other epochs may differ
    again = ds[0]
    torch.testing.assert_close(item["pixel_values"], again["pixel_values"])
    assert item["caption"] == again["caption"]


def test_a_file_that_breaks_later_is_skipped_mid_epoch_not_raised(tmp_path, caplog):
    for name in ("a", "b", "c"):
        write_video(coded_video(8), tmp_path / f"{name}.mp4")
    (tmp_path / "captions.csv").write_text("file,text\na,clip a\nb,clip b\nc,clip c\n")
    ds = load_dataset(tmp_path, num_frames=4, resolution=16)
    assert len(ds) == 3
    (tmp_path / "b.mp4").write_bytes(b"garbage" * 100)  # corrupted after the dataset was built
    with caplog.at_level(logging.WARNING, logger="tucker_lora.video.data"):
        items = [ds[i] for i in range(len(ds))]
    assert [i["caption"] for i in items] == ["clip a", "clip c", "clip c"]
    assert "b.mp4" in caplog.text


@pytest.mark.parametrize("layout", ["videodatainfo", "coco"])
def test_msrvtt_reader(tmp_path, layout):
    videos = tmp_path / "videos" / "all"
    for k in range(3):
        write_video(coded_video(8), videos / f"video{k}.mp4")
    if layout == "videodatainfo":
        data = {
            "videos": [{"video_id": f"video{k}", "split": "train" if k < 2 else "test"} for k in range(4)],
            "sentences": [
                {"video_id": f"video{k}", "caption": f"caption {k}.{j}", "sen_id": j}
                for k in range(4)
                for j in range(2)
            ],
        }
        name, split = "train_val_videodatainfo.json", "train"
    else:
        data = {"annotations": [{"image_id": f"video{k}", "caption": f"caption {k}", "id": k} for k in range(4)]}
        name, split = "MSR_VTT.json", None
    (tmp_path / "annotation").mkdir()
    (tmp_path / "annotation" / name).write_text(json.dumps(data))
    ds = load_dataset(tmp_path, split=split, num_frames=4, frame_stride=2, resolution=16)
    expected = 2 if layout == "videodatainfo" else 3  # the split keeps video0/1; video3 has no file
    assert len(ds) == expected
    assert {p.name for p, _ in ds.items} == {f"video{k}.mp4" for k in range(expected)}
    assert ds[1]["caption"].startswith("caption 1")
    assert ds[0]["pixel_values"].shape == (3, 4, 16, 16)
    assert len(msrvtt_dataset(tmp_path, tmp_path / "annotation" / name, num_frames=2, resolution=8)) == 3


def test_moving_shapes_are_deterministic_and_move_as_captioned():
    ds = MovingShapesDataset(num_videos=12, num_frames=8, resolution=32, seed=3)
    again = MovingShapesDataset(num_videos=12, num_frames=8, resolution=32, seed=3)
    other = MovingShapesDataset(num_videos=12, num_frames=8, resolution=32, seed=4)
    assert [ds.caption(i) for i in range(12)] == [again.caption(i) for i in range(12)]
    torch.testing.assert_close(ds[5]["pixel_values"], again[5]["pixel_values"])
    assert any(not torch.equal(ds[i]["pixel_values"], other[i]["pixel_values"]) for i in range(12))
    for i in range(12):
        frames, caption = ds.clip(i)
        words = caption.split()
        assert words[0] == "a" and words[3] == "moving" and len(words) == 5
        mask = torch.as_tensor((frames != 60).any(-1))  # shape pixels: not the grey background
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = [(xs * m).sum() / m.sum() for m in mask.float()]
        cy = [(ys * m).sum() / m.sum() for m in mask.float()]
        moved = {"left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1], "down": cy[-1] - cy[0]}
        assert moved[words[4]] > 8, (caption, moved)


def test_bad_data_inputs_name_the_thing(tmp_path):
    with pytest.raises(InputError, match="data directory '.*nowhere' does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot tell the layout of '.*empty'"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "captions.csv").write_text("file,caption\n")
    with pytest.raises(InputError, match="no usable videos in '.*empty'"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"nope")
    (tmp_path / "bad" / "captions.csv").write_text("file,caption\nx.mp4,hi\n")
    with pytest.raises(InputError, match=r"no usable videos in '.*bad'.*skipped 1: .*x\.mp4"):
        load_dataset(tmp_path / "bad")
    (tmp_path / "bad" / "captions.csv").write_text("name,words\nx.mp4,hi\n")
    with pytest.raises(InputError, match="captions.csv' has no file column"):
        load_dataset(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- media, EMA
def test_write_video_mp4_gif_and_grid(tmp_path):
    video = coded_video(6, 30, 40).astype(np.float32) / 255  # floats in [0, 1], odd-free sizes
    mp4 = write_video(video, tmp_path / "v.mp4", fps=4)
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 6 and [frame_index(f) for f in frames] == list(range(6))
    gif = write_video(coded_video(5, 15, 21), tmp_path / "v.gif")  # odd sizes are fine for a GIF
    assert read_frames(gif, 5).shape == (5, 15, 21, 3)
    grid = frame_grid([coded_video(7, 16, 16), coded_video(7, 16, 16)], tmp_path / "g.png", labels=["a", "b"])
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size[0] == 2 + 3 * (128 + 2)  # three columns (t=0, mid, end), frames enlarged to 128


def test_frame_grid_shows_the_chosen_frames_left_to_right(tmp_path):
    assert spread_frames(5) == (0, 1, 2, 3, 4)  # every frame when there are at most 8
    assert spread_frames(12) == (0, 2, 3, 5, 6, 8, 9, 11)  # round(k * 11 / 7), k = 0..7
    frames = spread_frames(12)
    grid = frame_grid([coded_video(12, 16, 16)], tmp_path / "g.png", labels=["a"], frames=frames)
    with Image.open(grid) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] == 2 + 8 * (128 + 2)  # eight columns, 16-pixel frames enlarged 8 times
    top = 12 + 12  # the column header, then the row's label
    shown = [frame_index(pixels[top : top + 128, 2 + c * 130 : 2 + c * 130 + 128]) for c in range(8)]
    assert shown == list(frames)
    with pytest.raises(ValueError, match="no frame 12"):
        frame_grid([coded_video(12, 16, 16)], tmp_path / "h.png", frames=[0, 12])


def test_ema_follows_with_warmup_swaps_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([p], decay=0.999)
    p.data.fill_(1.0)
    ema.step()  # d = min(0.999, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9))
    p.data.fill_(2.0)
    ema.step()  # d = 2/11
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.9 * 2 / 11 + 2 * 9 / 11))
    with ema.swapped_in():
        torch.testing.assert_close(p.data, ema.shadow[0])
    assert torch.equal(p.data, torch.full((3,), 2.0))
    other = AdapterEMA([torch.nn.Parameter(torch.zeros(3))])
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="does not fit"):
        AdapterEMA([torch.nn.Parameter(torch.zeros(4))]).load_state_dict(ema.state_dict())


# ---------------------------------------------------------------------------------------------- checkpoints
class FakeAccelerator:
    """What ``Checkpoints.save`` uses of an Accelerator; ``fail`` makes ``save_state`` die half-way."""

    is_main_process = True

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text("new")
        if self.fail:
            raise KeyboardInterrupt("killed while saving")
        (Path(path) / "optimizer.bin").write_text("new")


def test_checkpoint_save_is_atomic_and_keeps_the_total_limit(tmp_path):
    ckpts = Checkpoints(tmp_path, total_limit=2)
    for step in (1, 2):
        ckpts.save(FakeAccelerator(), step)
    assert [p.name for p in ckpts.all()] == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(FakeAccelerator(fail=True), 3)
    # the crash left a partial folder, but every complete checkpoint is intact and 'latest' ignores the partial
    assert [p.name for p in ckpts.all()] == ["checkpoint-1", "checkpoint-2"]
    assert ckpts.resolve("latest") == tmp_path / "checkpoint-2"
    assert sorted(os.listdir(tmp_path / "checkpoint-2")) == ["model.safetensors", "optimizer.bin"]
    ckpts.clean()
    assert not list(tmp_path.glob(".*partial"))
    ckpts.save(FakeAccelerator(), 3)
    assert [p.name for p in ckpts.all()] == ["checkpoint-2", "checkpoint-3"]
    assert ckpts.resolve("checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(InputError, match="checkpoint '.*checkpoint-9' does not exist"):
        ckpts.resolve(str(tmp_path / "checkpoint-9"))


# ---------------------------------------------------------------------------------------------- pipeline, adapters
def test_tiny_tokenizer_keeps_caption_words_whole_and_reloads(tmp_path):
    tok = tiny_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("a Red circle moving left, quickly").input_ids)
    assert tokens[:6] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "moving</w>", "left</w>"]
    assert tokens[-1] == "<|endoftext|>" and "quickly</w>" not in tokens  # unknown words fall back to characters
    tok.save_pretrained(tmp_path)
    assert type(tok).from_pretrained(tmp_path)("a red circle").input_ids == tok("a red circle").input_ids


def test_load_components_round_trip_and_bad_folders(tmp_path):
    tiny = tiny_components("animatediff")
    tiny.save(tmp_path / "pipe")
    loaded = load_components(tmp_path / "pipe")
    assert loaded.backbone == "animatediff" and type(loaded.unet).__name__ == "UNetMotionModel"
    torch.testing.assert_close(loaded.unet.state_dict(), tiny.unet.state_dict())
    assert loaded.resolution == 64
    with pytest.raises(InputError, match="pretrained model path '.*nothing' does not exist"):
        load_components(tmp_path / "nothing")
    (tmp_path / "no_index").mkdir()
    with pytest.raises(InputError, match="'.*no_index' is not a diffusers pipeline folder: it has no model_index.json"):
        load_components(tmp_path / "no_index")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text("{}")
    (tmp_path / "partial" / "unet").mkdir()
    with pytest.raises(InputError, match="lacks the subfolders 'vae', 'text_encoder', 'tokenizer', 'scheduler'"):
        load_components(tmp_path / "partial")


@pytest.mark.parametrize("backbone", ["unet3d", "animatediff"])
def test_lora_baseline_rank_matches_the_tucker_parameter_count(backbone):
    unet = tiny_components(backbone).unet
    ranks = (4, 4, 1, 1, 1)
    tucker = plan_adapter("tucker", unet, ranks)
    lora = plan_adapter("lora", unet, ranks)
    assert lora.layers == tucker.layers and tucker.num_params == tucker_num_params(unet, tucker.layers, ranks)
    r = lora.lora_rank
    assert r == matched_lora_rank(unet, lora.layers, ranks)
    gaps = {k: abs(lora_num_params(unet, lora.layers, k) - tucker.num_params) for k in range(1, 12)}
    assert gaps[r] == min(gaps.values())
    import copy

    peft_lora = get_peft_model(copy.deepcopy(unet), lora.config)
    assert peft_lora.get_nb_trainable_parameters()[0] == lora.num_params
    peft_tucker = get_peft_model(copy.deepcopy(unet), tucker.config)
    assert peft_tucker.get_nb_trainable_parameters()[0] == tucker.num_params
    assert sorted(peft_lora.base_model.targeted_module_names) == sorted(tucker.layers)


def test_lora_baseline_scales_its_update_by_alpha():
    """``--method lora`` (``plan_adapter("lora", ...)``) applies ``alpha * B A`` as Tucker-LoRA applies
    ``alpha * dW``: peft's ``lora_alpha / r`` is alpha. Each adapted layer equals its base conv with the weight
    ``W + alpha * B A`` (B A from the two LoRA weights by hand)."""
    import copy

    unet = tiny_components("unet3d").unet
    alpha = 2.5
    plan = plan_adapter("lora", unet, (4, 4, 1, 1, 1), alpha=alpha, lora_rank=3)
    assert plan.config.r == 3 and plan.config.lora_alpha == alpha * 3
    model = get_peft_model(copy.deepcopy(unet), plan.config)
    g = torch.Generator().manual_seed(0)
    for name in plan.layers[:2] + plan.layers[-1:]:
        layer = model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            B.copy_(torch.randn(B.shape, generator=g))
            dW = (B.flatten(1) @ A.flatten(1)).view(base.weight.shape)
            x = torch.randn(1, base.weight.shape[1], *[5] * (base.weight.ndim - 2), generator=g)
            ref = torch.func.functional_call(base, {"weight": base.weight + alpha * dW}, (x,))
            torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backbone", ["unet3d", "animatediff"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    from diffusers import DDPMScheduler
    from torch.utils.data import default_collate

    from tucker_lora.video.pipeline import gradient_checkpointing
    from tucker_lora.video.train import diffusion_loss, step_generator

    grads = []
    for checkpointing in (False, True):
        c = tiny_components(backbone)
        for module in (c.vae, c.text_encoder, c.unet):
            module.requires_grad_(False)
        with contextlib.ExitStack() as stack:
            if checkpointing:
                how = stack.enter_context(gradient_checkpointing(c.unet))
                assert how == ("blocks" if backbone == "unet3d" else "diffusers")
            torch.manual_seed(0)  # the adapter's random init, then the UNet3D's dropout
            model = get_peft_model(c.unet, plan_adapter("tucker", c.unet, (4, 4, 1, 1, 1), init_weights=False).config)
            model.train()
            batch = default_collate([MovingShapesDataset(1, 4, 64)[0]])
            scheduler = DDPMScheduler.from_config(c.scheduler.config)
            diffusion_loss(model, c, scheduler, batch, step_generator(0, 0, 0, 0)).backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["unet3d", "animatediff"])
def test_gradient_checkpointing_restores_the_unet(backbone):
    """After the block every UNet block calls its class's own forward again (UNet3D), or diffusers' switch is off
    again (AnimateDiff); a UNet that had it on keeps it on; the output is the same as before."""
    from tucker_lora.video.pipeline import gradient_checkpointing

    unet = tiny_components(backbone).unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    before = {id(b): type(b).forward for b in blocks}
    inputs = example_inputs(unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
    with gradient_checkpointing(unet) as how:
        if how == "blocks":
            assert all("forward" in vars(b) for b in blocks)  # the checkpointing wrappers are in place
        else:
            assert unet.is_gradient_checkpointing
    assert all("forward" not in vars(b) and b.forward.__func__ is before[id(b)] for b in blocks)
    assert not getattr(unet, "is_gradient_checkpointing", False)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, ref, rtol=0, atol=0)
    if how == "diffusers":  # switched on by the caller: left on
        unet.enable_gradient_checkpointing()
        with gradient_checkpointing(unet):
            pass
        assert unet.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------- training script
@pytest.mark.parametrize("backbone", ["unet3d", "animatediff"])
def test_two_training_steps_then_sampling_in_fresh_processes(backbone, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(TRAIN), "--backbone", backbone, "--output_dir", str(out), "--max_train_steps", "2"]
    run(args + FAST + ["--validation_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"])
    for name in ("adapter", "adapter_ema"):
        assert (out / name / "adapter_model.safetensors").is_file()
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "TUCKER_LORA" and config["base_model_name_or_path"] == str(out / "base_model")
    assert [p.name for p in Checkpoints(out).all()] == ["checkpoint-2"]  # total limit 1
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "lr", "videos_per_s", "peak_memory_mb", "epoch", "time"):
        assert all(np.isfinite(r[key]) for r in log), key
    assert log[0]["peak_memory_mb"] > 100  # peak RSS of a process that imported torch
    val = out / "validation" / "step-000002"
    assert (val / "grid.png").is_file() and len(list(val.glob("*.mp4"))) == 2
    assert (out / "data_examples.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == backbone and summary["steps"] == 2
    # sampling in a fresh process, the base model found through the adapter config
    samples = tmp_path / "samples"
    merge = ["--merge"] if backbone == "animatediff" else []
    proc = run(
        [sys.executable, str(SAMPLE), "--adapter", str(out / "adapter_ema"), "--num_frames", "4"]
        + ["--num_inference_steps", "2", "--seeds", "0", "1", "--output_dir", str(samples), "--video_format", "gif"]
        + merge
    )
    assert "frame grid" in proc.stdout and str(samples / "grid.png") in proc.stdout
    assert len(list(samples.glob("*.gif"))) == 4 and (samples / "grid.png").is_file()


def test_merged_and_unmerged_sampling_agree(tmp_path):
    from tucker_lora.video.sample import main as sample_main

    out = tmp_path / "run"
    train_main(["--output_dir", str(out), "--max_train_steps", "2", "--learning_rate", "1e-2", *FAST])
    videos = {}
    for merge in ([], ["--merge"]):
        result = sample_main(
            ["--adapter", str(out / "adapter"), "--num_frames", "3", "--num_inference_steps", "2"]
            + ["--prompts", "a red circle moving left", "--output_dir", str(tmp_path / f"s{len(merge)}"), *merge]
        )
        videos[bool(merge)] = np.asarray(Image.open(result["grid"]).convert("RGB")).astype(int)
    # the frame grid is a lossless PNG: the same frames up to float rounding (the MP4 codec would turn a
    # one-level change of a pixel into a different block decision, up to a dozen levels)
    assert np.abs(videos[True] - videos[False]).max() <= 2


def test_generate_passes_the_negative_prompt_to_the_pipeline():
    """``generate`` (and with it ``--negative_prompt`` of the sampling command) gives what diffusers' pipeline gives
    for the same prompt, negative prompt and seed, and the negative prompt changes the video."""
    from tucker_lora.video.pipeline import generate

    pipe = tiny_components("unet3d").pipeline()
    prompt, negative = "a red circle moving left", "a blue square moving right"
    ((_, _, with_negative),) = generate(pipe, [prompt], [3], 2, 2, 7.5, 64, 64, negative_prompt=negative)
    ((_, _, without),) = generate(pipe, [prompt], [3], 2, 2, 7.5, 64, 64)
    reference = pipe(
        prompt=prompt,
        negative_prompt=negative,
        num_frames=2,
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).frames[0]
    np.testing.assert_array_equal(with_negative, np.clip(reference * 255.0, 0, 255).round().astype(np.uint8))
    assert np.abs(with_negative.astype(int) - without.astype(int)).max() > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # 6 videos, accumulation 2: 3 steps per epoch, so 5 steps cross an epoch; the pause at 2 is mid-epoch
    common = [*FAST, "--max_train_steps", "5", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2"]
    common += ["--lr_warmup_steps", "1", "--checkpointing_steps", "100"]
    train_main(["--output_dir", str(tmp_path / "full"), *common])
    first = train_main(["--output_dir", str(tmp_path / "resumed"), *common, "--stop_after_steps", "2"])
    assert (
        first.paused
        and first.global_step == 2
        and [p.name for p in Checkpoints(tmp_path / "resumed").all()] == ["checkpoint-2"]
    )
    assert not (tmp_path / "resumed" / "adapter").exists()
    second = train_main(["--output_dir", str(tmp_path / "resumed"), *common, "--resume_from_checkpoint", "latest"])
    assert second.global_step == 5 and len(second.losses) == 3
    full_log, resumed_log = (
        read_log(tmp_path / "full" / "train_log.jsonl"),
        read_log(tmp_path / "resumed" / "train_log.jsonl"),
    )
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in resumed_log] == [0, 0, 0, 1, 1]
    for key in ("loss", "lr"):
        torch.testing.assert_close([r[key] for r in resumed_log], [r[key] for r in full_log], rtol=1e-6, atol=1e-7)
    for name in ("adapter", "adapter_ema"):
        a = load_file(tmp_path / "full" / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "resumed" / name / "adapter_model.safetensors")
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lora_baseline_trains_on_animatediff(tmp_path):
    result = train_main(
        [
            "--output_dir",
            str(tmp_path),
            "--backbone",
            "animatediff",
            "--method",
            "lora",
            "--max_train_steps",
            "1",
            *FAST,
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["lora_rank"] >= 1
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert result.model.get_nb_trainable_parameters()[0] == summary["trainable_parameters"]


@pytest.mark.parametrize("proxy", ["weight", "gradient"])
def test_ranks_auto_trains_within_the_budget_at_the_allocated_ranks(proxy, tmp_path):
    import tucker_lora

    budget = 9_000  # the tiny UNet3D's 48 default targets: 5,200 at (1, 1, 0, 0, 0), 21,632 at (4, 4, 1, 1, 1)
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_train_steps", "1", "--ranks", "auto", "--rank_budget", str(budget)]
    result = train_main([*argv, "--rank_proxy", proxy, "--rank_calibration_batches", "2", *FAST])
    # counted from the saved tensors, not from the code that chose the ranks
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    trained = sum(t.numel() for t in saved.values())
    assert trained == result.model.get_nb_trainable_parameters()[0]
    assert budget - 100 < trained <= budget
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == "auto" and summary["rank_budget"] == budget and summary["rank_proxy"] == proxy
    pattern = {k: tuple(v) for k, v in config["rank_pattern"].items()}
    assert len(pattern) == 48 and len(set(pattern.values())) > 1  # every default target, not one tuple
    assert (out / "rank_allocation.txt").read_text().startswith("layer")
    if proxy == "weight":  # the same allocation, made here on a fresh copy of the same base
        unet = load_components(out / "base_model").unet
        assert pattern == dict(tucker_lora.allocate_ranks(unet, budget, proxy="weight"))


def test_bad_command_lines_are_clear_errors(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    cases = {
        "--ranks auto needs --rank_budget N": ["--ranks", "auto"],
        "--rank_budget is for --ranks auto": ["--rank_budget", "9000"],
        "--ranks auto is for --method tucker": ["--ranks", "auto", "--rank_budget", "9000", "--method", "lora"],
        "--rank_budget 5199 is below the smallest adapter on the 48 target layers .*: 5200": [
            "--ranks",
            "auto",
            "--rank_budget",
            "5199",
            *FAST,
        ],
        "--ranks takes 5 integers r_o r_i r_t r_h r_w .*got 3: 4 4 1": ["--ranks", "4", "4", "1"],
        "--data_dir '.*no_data' does not exist": ["--data_dir", str(tmp_path / "no_data")],
        "lacks the subfolders 'vae', 'text_encoder'": ["--pretrained_model_name_or_path", str(tmp_path / "pipe")],
        "checkpoint '.*checkpoint-7' does not exist": ["--resume_from_checkpoint", str(tmp_path / "checkpoint-7")],
        "no usable videos in '.*empty_data'": ["--data_dir", str(tmp_path / "empty_data"), "--max_train_steps", "1"],
    }
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "empty_data").mkdir()
    (tmp_path / "empty_data" / "captions.csv").write_text("file,caption\n")
    for message, argv in cases.items():
        with pytest.raises(InputError, match=message):
            train_main(out + argv)
        assert train_cli(out + argv) == 2
        assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_two_process_ddp_keeps_ranks_identical_and_lowers_the_loss(tmp_path):
    helper = tmp_path / "ddp_helper.py"
    helper.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            import torch
            from diffusers import DDPMScheduler
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file
            from torch.utils.data import default_collate
            from tucker_lora.video.data import MovingShapesDataset
            from tucker_lora.video.train import diffusion_loss, main, step_generator

            out = sys.argv[1]
            result = main(sys.argv[2:])
            rank = int(os.environ["RANK"])
            state = get_peft_model_state_dict(result.model)
            save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/rank{rank}.safetensors")
            model, c = result.model.eval(), result.components
            scheduler = DDPMScheduler.from_config(c.scheduler.config)
            data = MovingShapesDataset(4, 4, 64, 0)

            def loss():  # fixed clips, noise and timesteps; eval mode (no dropout)
                total = 0.0
                with torch.no_grad():
                    for i in range(4):
                        for k in range(4):
                            batch = default_collate([data[i]])
                            total += diffusion_loss(model, c, scheduler, batch, step_generator(9, k, i, 0)).item()
                return total / 16

            after = loss()
            with model.disable_adapter():
                before = loss()
            with open(f"{out}/loss{rank}.json", "w") as f:
                json.dump({"before": before, "after": after}, f)
            """
        )
    )
    out = tmp_path / "ddp"
    out.mkdir()
    run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(helper), str(out)]
        + ["--output_dir", str(out), "--max_train_steps", "4", "--learning_rate", "5e-3", "--checkpointing_steps", "2"]
        + ["--num_frames", "4", "--num_synthetic_videos", "8", "--validation_steps", "0"],
        timeout=240,
    )
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "core" in k)  # the cores moved from zero
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    loss = json.loads((out / "loss0.json").read_text())
    assert loss["after"] < loss["before"] - 1e-3, loss
    assert json.loads((out / "loss1.json").read_text()) == loss
