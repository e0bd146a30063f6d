"""Register Tucker-LoRA with peft in processes that never ``import tucker_lora``.

The installed ``tucker_lora_hook.pth`` (one line, ``import tucker_lora_hook``) runs this at interpreter
start-up. It imports nothing and only puts a finder at the front of ``sys.meta_path``, which looks at
the name of each import and otherwise lets the import system go on as usual. When ``peft`` is imported,
peft loads as usual; right after, the finder imports ``tucker_lora``, which registers the method, so
``PeftModel.from_pretrained`` reads Tucker-LoRA folders with no import of ours in the user's code. A
failing ``tucker_lora`` import becomes a warning and leaves ``import peft`` working.

``when_imported(name, callback)`` is the mechanism: ``callback()`` runs right after module ``name`` has been
executed (at once if it already has been); the finder leaves ``sys.meta_path`` when nothing is pending.
"""

import sys

TRIGGER = "peft"


class PostImportHook:
    """A ``sys.meta_path`` finder that runs callbacks right after given modules have been executed.

    For a watched name it finds the spec with the finders after it and returns that spec with its loader's
    ``exec_module`` wrapped. It does not leave on ``find_spec`` alone: ``importlib.util.find_spec("peft")``
    (the availability checks of transformers and diffusers) finds specs without executing them.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list] = {}

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                _run_after_exec(spec.loader, name)
                return spec
        return None


_HOOK = PostImportHook()


def _run_after_exec(loader: object, name: str) -> None:
    """Wrap this loader object's ``exec_module``: run it, then the callbacks pending for ``name``."""
    run = getattr(loader, "exec_module", None)
    if run is None:
        return

    def exec_module(module: object) -> None:
        try:
            run(module)
        finally:
            del loader.exec_module  # back to the loader's own method
        _fire(name)

    try:
        loader.exec_module = exec_module
    except AttributeError:  # a loader without an instance dict: the module loads, the callbacks wait
        pass


def _fire(name: str) -> None:
    callbacks = _HOOK.pending.pop(name, [])
    if not _HOOK.pending and _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
    for callback in callbacks:
        callback()


def when_imported(name: str, callback) -> None:
    """Run ``callback()`` right after module ``name`` is first executed, or now if it is already imported."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback()
        return
    _HOOK.pending.setdefault(name, []).append(callback)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def register() -> None:
    """Import ``tucker_lora`` (its import registers the method with peft); a failure is a warning."""
    try:
        import tucker_lora  # noqa: F401
    except Exception as error:  # noqa: BLE001 - peft itself imported fine; say why Tucker-LoRA is missing
        import warnings

        warnings.warn(
            f"tucker-lora is installed but could not register with peft ({type(error).__name__}: {error}); "
            "Tucker-LoRA adapters will not load until `import tucker_lora` works",
            stacklevel=2,
        )


def uninstall() -> None:
    """Drop every pending callback and leave ``sys.meta_path`` (for measurements and tests)."""
    _HOOK.pending.clear()
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register Tucker-LoRA right after peft is imported (what the ``.pth`` file runs)."""
    if register not in _HOOK.pending.get(TRIGGER, []):
        when_imported(TRIGGER, register)


install()
