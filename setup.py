"""Ship ``tucker_lora_hook.pth`` into site-packages (the configuration itself is in pyproject.toml).

Python runs the ``import`` line of every ``.pth`` file in site-packages at start-up; this one imports the
small ``tucker_lora_hook`` module, which registers Tucker-LoRA with peft when peft is first imported. The
file goes to the root of a built wheel, and, for ``pip install -e``, to the root of setuptools' editable
wheel (the ``install_lib`` that ``editable_wheel`` sets), so both kinds of install get it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "tucker_lora_hook.pth"
PTH_LINE = "import tucker_lora_hook\n"


class build_py_with_pth(build_py):
    """``build_py``, then the ``.pth`` file beside the built modules (or into the editable wheel)."""

    def run(self) -> None:
        super().run()
        root = self.build_lib
        if self.editable_mode:
            root = self.distribution.get_command_obj("install").install_lib or root
        path = Path(root, PTH_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


setup(cmdclass={"build_py": build_py_with_pth})
