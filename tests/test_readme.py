"""The README's usage example runs as written, on a tiny UNet in place of a downloaded one."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path):
    code = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    loader = 'UNet3DConditionModel.from_pretrained("path/to/text-to-video", subfolder="unet")'
    assert code.count(loader) == 2
    code = code.replace(loader, "tiny_unet3d()").replace('"out/adapter"', repr(str(tmp_path / "adapter")))
    namespace: dict = {}
    exec("from tucker_lora.testing import tiny_unet3d\n" + code, namespace)
    unet = namespace["unet"]
    assert type(unet).__name__ == "UNet3DConditionModel"
    assert not any("tucker_lora" in n for n, _ in unet.named_parameters())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapted = namespace["model"].base_model.targeted_module_names
    assert len(adapted) == 48 and any(".temp_convs." in n for n in adapted)
    assert namespace["model"].peft_config["default"].ranks == (4, 4, 3, 1, 1)
    fresh = namespace["tiny_unet3d"]()
    torch.testing.assert_close(unet.state_dict(), fresh.state_dict())  # zero-core init: merge changes nothing
