"""Loading in a process that never imports tucker_lora (the start-up hook ``tucker_lora_hook.pth``) and
the model card of a saved adapter folder, both in fresh processes."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from conftest import TARGETS, ToyVideoNet, run_python
from tucker_lora import TuckerLoraConfig
from tucker_lora.card import MARKER

TESTS = Path(__file__).parent


def _importtime_children(name: str) -> list[str]:
    """Modules imported while ``name`` was imported at start-up (``python -X importtime``)."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, cwd=TESTS
    ).stderr
    lines = [re.match(r"import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$", line) for line in err.splitlines()]
    lines = [(len(m.group(1)), m.group(2)) for m in lines if m]
    at = [i for i, (_, n) in enumerate(lines) if n == name]
    assert at, f"{name} is not imported at start-up: tucker_lora_hook.pth is missing (run `pip install -e .`)"
    depth, children = lines[at[0]][0], []
    for d, n in reversed(lines[: at[0]]):  # importtime prints children before their parent
        if d <= depth:
            break
        children.append(n)
    return children


def test_start_up_hook_imports_nothing():
    """The .pth hook is imported at start-up and imports no module of its own (no torch, peft or tucker_lora)."""
    assert _importtime_children("tucker_lora_hook") == []
    names = ("tucker_lora_hook", "tucker_lora", "peft", "torch")
    out = run_python(f"import sys; print(*(m in sys.modules for m in {names!r}))")
    assert out.split() == ["True", "False", "False", "False"]


def test_adapter_loads_in_a_process_that_never_imports_tucker_lora(tmp_path):
    """PeftModel.from_pretrained in a fresh process with only peft imported (after an availability check by
    importlib.util.find_spec, as transformers and diffusers make): the same output as the saved model."""
    torch.manual_seed(0)
    base = ToyVideoNet()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    x = torch.randn(1, 3, 4, 6, 6)
    model = get_peft_model(base, TuckerLoraConfig(target_modules=TARGETS, init_weights=False, ranks=(3, 2, 2, 2, 1)))
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, tmp_path / "io.safetensors")
    model.save_pretrained(tmp_path / "adapter")
    out = run_python(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("peft") is not None
        import torch
        from conftest import ToyVideoNet
        from peft import PeftModel
        from safetensors.torch import load_file
        assert "tucker_lora" in sys.modules  # imported right after peft, by the hook
        base = ToyVideoNet()
        base.load_state_dict(load_file({str(tmp_path / "base.safetensors")!r}))
        io = load_file({str(tmp_path / "io.safetensors")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            print(type(model.base_model).__name__, torch.equal(model(io["x"]), io["y"]))
        """
    )
    assert out.split() == ["TuckerLoraModel", "True"]


def test_a_failing_registration_warns_and_leaves_peft_importable():
    out = run_python(
        """
        import sys, warnings
        sys.modules["tucker_lora"] = None  # makes `import tucker_lora` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        print(peft.PeftModel.__name__, any("could not register with peft" in str(w.message) for w in caught))
        """
    )
    assert out.split() == ["PeftModel", "True"]


def test_model_card_describes_the_adapter_and_its_two_line_load_works(tmp_path):
    """The saved README says what the adapter is; its python block, run as written in a fresh process (with
    base_model and the folder filled in), loads the adapter; saving again keeps one section."""
    torch.manual_seed(0)
    base = ToyVideoNet()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    config = TuckerLoraConfig(target_modules=TARGETS, ranks=(3, 2, 2, 2, 1), alpha=2.0, init_weights=False)
    model = get_peft_model(base, config)
    model.add_adapter("other", copy.deepcopy(config))
    for _ in range(2):
        model.save_pretrained(tmp_path / "adapter", selected_adapters=["default", "other"])
    for folder in (tmp_path / "adapter", tmp_path / "adapter" / "other"):
        card = (folder / "README.md").read_text()
        assert card.count(MARKER) == 1
        assert "pip install tucker-lora" in card and "TUCKER_LORA" in card and "(3, 2, 2, 2, 1)" in card
        assert re.search(r"^tags:\n(- .*\n)*- tucker-lora$", card, re.M)
    (code,) = re.findall(r"```python\n(.*?)```", (tmp_path / "adapter" / "README.md").read_text(), re.S)
    assert len(code.strip().splitlines()) == 2
    code = code.replace('"path/to/this/folder"', repr(str(tmp_path / "adapter")))
    x = torch.randn(1, 3, 4, 6, 6)
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, tmp_path / "io.safetensors")
    prelude = (
        "import torch\nfrom conftest import ToyVideoNet\nfrom safetensors.torch import load_file\n"
        f"base_model = ToyVideoNet()\nbase_model.load_state_dict(load_file({str(tmp_path / 'base.safetensors')!r}))\n"
    )
    check = (
        f"io = load_file({str(tmp_path / 'io.safetensors')!r})\nprint((model(io['x']) - io['y']).abs().max().item())\n"
    )
    assert float(run_python(prelude + code + check)) < 1e-6
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "TUCKER_LORA"
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")


def test_model_card_of_a_model_loaded_from_a_path(tmp_path):
    """A base model whose ``name_or_path`` is a ``pathlib.Path`` (diffusers keeps what ``from_pretrained`` was
    given): peft dumps it as a python-object YAML tag; saving still works, twice, and the card's metadata is
    plain YAML that a safe loader reads, naming the path as text."""
    import yaml

    base = ToyVideoNet()
    base.config = {"_name_or_path": tmp_path / "bases" / "unet3d"}  # what peft's card reads
    model = get_peft_model(base, TuckerLoraConfig(target_modules=TARGETS, ranks=(2, 2, 1, 1, 1)))
    for _ in range(2):
        model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == str(tmp_path / "bases" / "unet3d")
    assert card.count(MARKER) == 1 and "tucker-lora" in metadata["tags"]
