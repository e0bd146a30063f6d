"""The benchmark scripts stay runnable: their smallest cases, one round each, and what their tables rest on
(matched parameter budgets, the layer-level columns, the paired ratios)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from tucker_lora import TuckerLoraLayer, functional

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (it is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _pair_script() -> tuple[ModuleType, ModuleType]:
    """``(bench_layers, bench_pair)``, with bench_skinny imported first too: bench_pair imports both."""
    layers, _ = _script("bench_layers"), _script("bench_skinny")
    return layers, _script("bench_pair")


@pytest.mark.parametrize("shape", ["TINY", "640"])
def test_bench_layers_columns_are_layers_at_matched_budgets(shape):
    """Every adapter column is the adapted layer itself (no model-level wrapper, as LyCORIS's), and the
    baselines' parameter counts are the nearest their rank allows to Tucker's."""
    pytest.importorskip("lycoris")
    bench = _script("bench_layers")
    chosen = bench.TINY if shape == "TINY" else next(s for s in bench.SHAPES if s.name.startswith("Conv3d 640"))
    columns = bench.build_columns(chosen, (4, 4, 1, 1, 1), "cpu")
    tucker = columns["tucker auto"]
    assert isinstance(tucker, TuckerLoraLayer)
    assert isinstance(columns["tucker auto, freeze_modes=('i',)"], TuckerLoraLayer)
    lora = next(m for n, m in columns.items() if n.startswith("peft LoRA"))
    assert type(lora).__module__.startswith("peft.tuners.lora")
    budget = bench.n_trainable(tucker)
    out_ch, in_ch, *k = tucker.get_base_layer().weight.shape
    taps = math.prod(k)
    for name, per_rank in (("peft LoRA", lambda r: r * (in_ch * taps + out_ch)),
                           ("LyCORIS", lambda r: r * (in_ch + out_ch) + r * r * taps)):  # fmt: skip
        column = next(n for n in columns if n.startswith(name))
        r = int(column.rsplit("=", 1)[1])
        count = bench.n_trainable(columns[column])
        assert count == per_rank(r), name
        assert abs(count - budget) <= min(abs(per_rank(s) - budget) for s in (r - 1, r + 1) if s >= 1), name
    # every column computes with the one base weight (copies of a frozen layer, timed against each other, differ
    # by where their weight lands in memory), and only full fine-tuning trains it
    base_weight = columns["frozen base"].weight
    for name, module in columns.items():
        weights = [p for p in module.parameters() if p.shape == base_weight.shape]
        assert weights and all(w.data_ptr() == base_weight.data_ptr() for w in weights), name
        assert all(w.requires_grad == (name == "full fine-tuning") for w in weights), name


def test_bench_layers_column_selection_and_fused_column():
    """``only`` keeps the frozen base and the named columns (a baseline's rank suffix left out), and ``fused`` adds
    the default Tucker layer wrapped to run with the fused kernels on, sharing the base weight."""
    bench = _script("bench_layers")
    columns = bench.build_columns(
        bench.TINY, (4, 4, 1, 1, 1), "cpu", fused=True, only=["tucker auto", "peft LoRA", bench.FUSED]
    )
    assert [n.split(" r=")[0] for n in columns] == ["frozen base", "tucker auto", "peft LoRA", bench.FUSED]
    fused = columns[bench.FUSED]
    assert isinstance(fused.layer, TuckerLoraLayer) and fused.device_type == "cpu"
    assert fused.layer.get_base_layer().weight.data_ptr() == columns["frozen base"].weight.data_ptr()


def test_bench_layers_one_round_of_the_tiny_shape():
    """One round of the per-call row: every column timed, the frozen base as the floor, and the saved bytes
    ordered as the freeze_modes section says (U_i frozen keeps less than the frozen conv itself)."""
    pytest.importorskip("lycoris")
    bench = _script("bench_layers")
    result = bench.bench_shape(bench.TINY, (4, 4, 1, 1, 1), "cpu", repeats=1, warmup=0)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["frozen base"]["train_ratio"] == rows["frozen base"]["infer_ratio"] == 1.0
    assert all(r["train_ms"] > 0 and r["infer_ratio"] > 0 for r in rows.values())
    saved = {name: r["saved_vs_x"] for name, r in rows.items()}
    assert saved["tucker auto, freeze_modes=('i',)"] < saved["frozen base"] < saved["tucker auto"]
    assert "| tucker auto |" in bench.markdown(result)


def test_bench_layers_median_of_runs_keeps_each_runs_ratio():
    """Over several runs the table gives each ratio's median and the lowest and highest run."""
    bench = _script("bench_layers")

    def run(train: float, infer: float) -> list[dict]:
        row = {"method": "tucker auto", "params": 1, "train_ms": 10 * train, "train_ratio": train,
               "train_pipelined_ratio": None, "infer_ratio": infer, "saved_vs_x": 1.0, "peak_mb": 1.0}  # fmt: skip
        return [{"shape": "s", "rows": [row]}]

    (merged,) = bench.median_of_runs([run(1.10, 1.00), run(1.02, 1.07), run(1.05, 1.04)])
    (row,) = merged["rows"]
    assert row["train_ratio"] == 1.05 and row["infer_ratio"] == 1.04 and row["train_ms"] == 10.5
    assert row["train_ratio_runs"] == [1.10, 1.02, 1.05] and "train_pipelined_ratio_runs" not in row
    assert "| 10.5 | 1.05x (1.02-1.10) | 1.04x (1.00-1.07) |" in bench.markdown(merged)


def test_bench_unet_interleaved_pairs_each_step_with_the_frozen_one():
    """The interleaved timing builds every method's UNet in one process and reports per-method medians, paired
    ratios (the frozen one exactly 1) and the memory a step adds; Tucker's trainable count, read there, gives peft
    LoRA its matched rank."""
    pytest.importorskip("diffusers")
    bench = _script("bench_unet")
    args = argparse.Namespace(
        device="cpu", channels=[32, 64], frames=2, size=8, batch=1, warmup=1, rounds=1, autocast="none", compile=None
    )
    run = bench.Run(args, "tucker (4,4,1,1,1)", 0)
    budget = sum(p.numel() for p in run.params)
    assert budget > 0 and run.step() > 0
    torch.manual_seed(0)
    result = bench.interleaved(args, None, bench.METHODS)
    assert list(result) == bench.METHODS
    assert result["frozen"]["ratio"] == 1.0 and result["tucker (4,4,1,1,1)"]["trainable"] == budget
    assert all(r["step_s"] > 0 and r["ratio"] > 0 and r["peak_added_mb"] >= 0 for r in result.values())
    lora = bench.Run(args, "peft LoRA (matched)", budget)
    assert result["peft LoRA (matched)"]["trainable"] == sum(p.numel() for p in lora.params)


def test_bench_unet_methods_share_the_base_weights_but_full_fine_tuning():
    """The interleaved timing's frozen, Tucker and LoRA models compute with the base model's own weight tensors;
    full fine-tuning, whose optimiser steps them, with a copy of its own."""
    pytest.importorskip("diffusers")
    bench = _script("bench_unet")
    args = argparse.Namespace(device="cpu", channels=[32, 64], frames=2, size=8, batch=1, autocast="none", compile=None)
    base = bench.build_unet(args.channels)
    base_ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    for method in bench.METHODS:
        model = bench.Run(args, method, 1000, bench.base_copy(base, method)).model
        # the base weights under their names in the wrapped model (peft prefixes and base_layer infixes stripped)
        ptrs = {
            n.removeprefix("base_model.model.").replace(".base_layer", ""): p.data_ptr()
            for n, p in model.named_parameters()
        }
        shared = [n for n, ptr in base_ptrs.items() if ptrs.get(n) == ptr]
        assert len(shared) == (0 if method == "full fine-tuning" else len(base_ptrs)), method
    assert all(not p.requires_grad for p in base.parameters())


def test_bench_skinny_times_both_ways_on_the_same_products():
    """Both ways compute the same products (numpy as the reference), with blocks that divide the sizes or not, and
    one round of the table carries its ratios."""
    bench = _script("bench_skinny")
    for C, S in ((24, 40), (7, 10)):
        x, y, z, M_proj, M_up = bench.random_case(C, S, 3)
        y0 = y.numpy().copy()
        calls = bench.cases(x, y, z, M_proj, M_up, per_thread=8)
        expected_P = M_proj.numpy() @ x.numpy()
        np.testing.assert_allclose(calls["projection mm"]().numpy(), expected_P, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(calls["projection split"]().numpy(), expected_P, rtol=1e-4, atol=1e-4)
        update = M_up.numpy() @ z.numpy()
        np.testing.assert_allclose(calls["update addmm_"]().numpy(), y0 + update, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(calls["update split"]().numpy(), y0 + 2 * update, rtol=1e-4, atol=1e-4)
        for batch in (1, 4):
            outer = bench.outer_cases(x, z, batch)
            expected_dU = x.numpy() @ z.numpy().T  # the samples' sum is the product over all positions
            np.testing.assert_allclose(outer["outer x z^T"]().numpy(), expected_dU, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(outer["outer (z x^T)^T"]().numpy(), expected_dU, rtol=1e-4, atol=1e-4)
    (row,) = bench.main(["--rounds", "1", "--sizes", "24", "40", "--threads", "2", "--cold", "--batch", "4"])
    assert row["projection ratio"] > 0 and row["update ratio"] > 0 and row["outer ratio"] > 0


def test_bench_pair_reports_the_median_of_paired_ratios():
    """``bench_pair`` pairs each round's times: its ratio is the median of the per-round ratios (numpy from the raw
    times), its interval brackets it, and a prefix naming two columns is refused."""
    pytest.importorskip("lycoris")
    layers, bench = _pair_script()
    tiny = layers.SHAPES.index(layers.TINY)
    result = bench.main(["--shape", str(tiny), "--columns", "tucker auto", "LyCORIS", "--rounds", "5", "--warmup", "1"])
    times = result["times"]
    (lycoris,) = (k for k in times if k.startswith("LyCORIS"))
    ratios = np.array(times["tucker auto"]) / np.array(times[lycoris])
    entry = result[f"tucker auto / {lycoris}"]
    assert entry["median"] == pytest.approx(float(np.median(ratios)))
    assert entry["first_faster"] == int((ratios < 1).sum())
    assert len(times["frozen base"]) == 5
    med, low, high = bench.median_interval([float(v) for v in range(1, 102)])
    assert med == 51 and 40 < low < 51 < high < 62
    assert bench.median_interval([2.0] * 9) == (2.0, 2.0, 2.0)
    with pytest.raises(SystemExit, match="matches"):
        bench.find_column({"tucker auto": None, "tucker merged": None}, "tucker")
    small = bench.main(["--shape", str(tiny), "--spatial", "2", "3", "2", "--rounds", "1", "--inference"])
    assert small["shape"] == "Conv3d 16x16x(3,3,3), 2x3x2" and small["kind"] == "inference"


def test_bench_pair_jitter_holds_a_new_pad_of_random_size_per_call():
    """``--jitter``: before each call the last pad is freed and one of another size, under ``PAD_MAX`` bytes, is
    held; the run says it jittered."""
    pytest.importorskip("lycoris")
    layers, bench = _pair_script()
    jitter, sizes = bench.Jitter(), []
    for _ in range(6):
        last = jitter.pad
        jitter()
        assert jitter.pad is not last and jitter.pad.numel() * 4 < bench.PAD_MAX
        sizes.append(jitter.pad.numel())
    assert len(set(sizes)) == len(sizes)
    tiny = str(layers.SHAPES.index(layers.TINY))
    assert bench.main(["--shape", tiny, "--rounds", "2", "--warmup", "1", "--jitter"])["jitter"] is True
    assert bench.main(["--shape", tiny, "--rounds", "1", "--warmup", "0"])["jitter"] is False


def test_bench_pair_fresh_weight_column_skips_only_the_buffer():
    """The ``fresh weight`` column computes what the merged column does, without touching the scratch buffer."""
    layers, bench = _pair_script()
    columns = layers.build_columns(layers.TINY, (4, 4, 1, 1, 1), "cpu")
    fresh = bench.FreshWeight(columns["tucker merged"])
    x = torch.randn(layers.TINY.input)
    functional.release_scratch()
    with torch.no_grad():
        y_fresh = fresh(x)
        assert not functional._SCRATCH.buffers
        y_merged = columns["tucker merged"](x)
        assert functional._SCRATCH.buffers
    functional.release_scratch()
    assert torch.equal(y_fresh, y_merged)


def test_bench_pair_split_times_exactly_the_base_convolutions(monkeypatch):
    """``--split``: with a clock that ticks once per reading, a training step books two ticks (the base forward and
    its input gradient) in every column, however the column runs them, and an inference call one; the adapter's
    own convolution is not booked. ``main`` pairs ``step - base ops`` as the rest, and refuses full fine-tuning."""
    pytest.importorskip("lycoris")
    layers, bench = _pair_script()
    columns = layers.build_columns(layers.TINY, (4, 4, 1, 1, 1), "cpu")
    x = torch.randn(layers.TINY.input, requires_grad=True)
    dy = torch.randn(layers.TINY.input)
    base_ops = bench.BaseOps(columns["frozen base"].weight.shape)
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(ticks)))
    names = ["frozen base", "tucker auto", "tucker merged", "peft LoRA", "LyCORIS"]
    with base_ops:
        for name in names:
            column = columns[bench.find_column(columns, name)]
            base_ops.attach(name, column)
            for grad, booked in ((True, 2), (False, 1)):
                base_ops.seconds = 0.0
                with torch.set_grad_enabled(grad):
                    y = layers.call(column, x)
                    if grad:
                        y.backward(dy)
                assert base_ops.seconds == booked, (name, grad)
    assert functional.ConvGeometry.conv is base_ops._saved["conv"]  # the patch is gone on exit
    monkeypatch.undo()
    tiny = str(layers.SHAPES.index(layers.TINY))
    result = bench.main(["--shape", tiny, "--columns", "tucker auto", "LyCORIS", "--rounds", "3", "--split"])
    assert result["split"] is True
    (lycoris,) = (k for k in result["times"] if k.startswith("LyCORIS"))
    rest = np.array(result["times"][lycoris]) - np.array(result["base ops"][lycoris])
    rest_tucker = np.array(result["times"]["tucker auto"]) - np.array(result["base ops"]["tucker auto"])
    assert result[f"tucker auto / {lycoris}, rest"]["median"] == pytest.approx(float(np.median(rest_tucker / rest)))
    assert all(0 < b < t for b, t in zip(result["base ops"][lycoris], result["times"][lycoris], strict=True))
    with pytest.raises(SystemExit, match="trains the base weight"):
        bench.main(["--shape", tiny, "--columns", "tucker auto", "full", "--rounds", "1", "--split"])


def test_count_ops_counts_kernels_and_leaves_out_views_and_allocations():
    """On a known op sequence the counter records each kernel-launching op once (in-place, copies and the backward
    included) and none of the views, allocations and gradients stored without a kernel; peft LoRA's Conv3d adds
    what its forward ``base(x) + lora_B(lora_A(x)) * scaling`` and that forward's backward issue, counted by hand."""
    layers, count = _script("bench_layers"), _script("count_ops")
    a, x = torch.randn(3, 4), torch.randn(3, requires_grad=True)
    with count.counting() as counter:
        b = a.t().t().view(12).view(3, 4).expand(2, 3, 4)  # views of a contiguous tensor
        torch.empty(5), a.new_empty(2)  # allocations
        c = torch.mm(a, a.t())  # mm
        d = b[0] + c[0, 0]  # add
        a.t().contiguous()  # clone
        a.to(torch.float64).mul_(2)  # _to_copy, mul_
        (x * d[0, :3]).sum().backward()  # mul, sum; backward: ones_like (the seed), sum's expand, mul: x's gradient
    assert counter.ops == ["mm", "add", "clone", "_to_copy", "mul_", "mul", "sum", "ones_like", "mul"]
    assert torch.equal(x.grad, d[0, :3])
    columns = layers.build_columns(layers.TINY, (4, 4, 1, 1, 1), "cpu")
    lora = next(m for name, m in columns.items() if name.startswith("peft LoRA"))
    x = torch.randn(layers.TINY.input, requires_grad=True)
    ops = count.count_column(lora, x, torch.randn(layers.TINY.input))
    frozen = count.count_column(columns["frozen base"], x, torch.randn(layers.TINY.input))
    assert frozen == {"train": ["convolution", "convolution_backward"], "infer": ["convolution"]}
    assert count.added_ops(ops["infer"], frozen["infer"]) == {"convolution": 2, "mul": 1, "add": 1}
    # backward: the scaling's mul, each LoRA conv's backward, the sum of the two input gradients
    assert count.added_ops(ops["train"], frozen["train"]) == {
        "convolution": 2, "mul": 2, "add": 2, "convolution_backward": 2,
    }  # fmt: skip


def test_fused_tucker_adds_no_more_ops_than_peft_lora():
    """With the fused kernels (counted on the CPU under the Triton interpreter), a Tucker-LoRA Conv3d at the default
    ranks adds no more kernel launches than peft LoRA's, per training step and per inference call."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("counted on the CPU, under the Triton interpreter (conftest.py sets it where there is no GPU)")
    layers, count = _script("bench_layers"), _script("count_ops")
    with count.triton_switch(True):
        result = count.count_shape(layers.TINY, (4, 4, 1, 1, 1), triton=True)
    rows = {row["method"].split(" r=")[0]: row for row in result["rows"]}
    for key in ("train_added", "infer_added"):
        assert rows["tucker factored"][key] <= rows["peft LoRA"][key], key
        assert rows["tucker auto"][key] <= rows["peft LoRA"][key], key
    launched = [op for op in rows["tucker factored"]["train_ops"] if op.startswith("triton:")]
    assert len(launched) == 4  # the small kernel, the two passes, the kernel gradients
