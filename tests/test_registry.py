"""Registration with peft in fresh processes: either import order, and loading a checkpoint there."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from conftest import TARGETS, ToyVideoNet, run_python
from tucker_lora import TuckerLoraConfig


@pytest.mark.parametrize(
    "imports",
    [
        "import peft\nimport tucker_lora",
        "import tucker_lora\nimport peft",
        "from peft import PeftModel, PeftType\nimport tucker_lora",
    ],
)
def test_registration_survives_import_order(imports):
    out = run_python(
        imports
        + """
        from peft import PeftType, get_peft_model, PeftConfig
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        import torch
        cfg = tucker_lora.TuckerLoraConfig(target_modules=["0"])
        m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), cfg)
        print(cfg.peft_type.value, PeftType("TUCKER_LORA").name, type(m.base_model).__name__,
              PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TUCKER_LORA].__name__)
        """.replace("\n        ", "\n")
    )
    assert out.split() == ["TUCKER_LORA", "TUCKER_LORA", "TuckerLoraModel", "TuckerLoraModel"]


def test_from_pretrained_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    base = ToyVideoNet()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    x = torch.randn(1, 3, 4, 6, 6)
    save_file({"x": x}, tmp_path / "x.safetensors")
    pm = get_peft_model(base, TuckerLoraConfig(target_modules=TARGETS, init_weights=False, ranks=(3, 2, 0, 2, 1)))
    expected = pm(x)
    pm.save_pretrained(tmp_path / "adapter")
    run_python(
        f"""
        import torch, tucker_lora
        from peft import PeftConfig, PeftModel
        from safetensors.torch import load_file, save_file
        from conftest import ToyVideoNet
        d = {str(tmp_path)!r}
        assert type(PeftConfig.from_pretrained(d + "/adapter")).__name__ == "TuckerLoraConfig"
        base = ToyVideoNet()
        base.load_state_dict(load_file(d + "/base.safetensors"))
        model = PeftModel.from_pretrained(base, d + "/adapter")
        save_file({{"y": model(load_file(d + "/x.safetensors")["x"]).contiguous()}}, d + "/y.safetensors")
        """
    )
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], expected)
