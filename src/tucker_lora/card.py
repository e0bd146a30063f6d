"""The model card (``README.md``) of a saved Tucker-LoRA adapter folder.

peft writes a card from its empty template before it saves each adapter's config; ``write_model_card``
(called by ``TuckerLoraConfig.save_pretrained``) puts a section at the top of its text saying what the
adapter is and how to load it, and adds the ``tucker-lora`` tag. Saving again leaves one section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

MARKER = "<!-- tucker-lora adapter -->"
END_MARKER = "<!-- end of tucker-lora adapter -->"
TAG = "tucker-lora"
CARD_NAME = "README.md"


def card_section(config: Any) -> str:
    """The markdown section describing the adapter of ``config`` (a ``TuckerLoraConfig``)."""
    base = config.base_model_name_or_path
    base_model = f"`{base}`" if base else "the model it was trained on"
    return f"""{MARKER}
# Tucker-LoRA adapter

A five-mode Tucker-LoRA adapter (peft type `TUCKER_LORA`) for {base_model}: each adapted Linear / Conv
layer computes `W + alpha * dW`, with `dW` the Tucker product of a small core and one factor per weight
mode (ranks `(r_o, r_i, r_t, r_h, r_w) = {tuple(config.ranks)}`, `alpha = {config.alpha}`{_patterns(config)}).

Loading it needs the `tucker-lora` package (`pip install tucker-lora`); then, as for any peft adapter
(`base_model` is {base_model}, loaded as usual):

```python
import peft, tucker_lora  # tucker_lora registers the method with peft
model = peft.PeftModel.from_pretrained(base_model, "path/to/this/folder")
```

Tools that read only LoRA files need a LoRA export of this adapter.
{END_MARKER}
"""


def _patterns(config: Any) -> str:
    per_layer = [name for name in ("rank_pattern", "alpha_pattern") if getattr(config, name, None)]
    return f"; per-layer values in `{'` and `'.join(per_layer)}`" if per_layer else ""


class _PathsAsText(yaml.SafeLoader):
    """A safe YAML loader that reads a pickled ``pathlib`` path as its text."""


def _path_as_text(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    return str(Path(*loader.construct_sequence(node)))


_PathsAsText.add_multi_constructor("tag:yaml.org,2002:python/object/apply:pathlib.", _path_as_text)


def _paths_as_text(card_text: str) -> str:
    """``card_text`` with a ``pathlib`` object in its metadata written as a string.

    peft writes ``base_model`` with ``yaml.dump``, so a model loaded from a ``Path`` gets a
    ``!!python/object/apply:pathlib.PosixPath`` tag that a safe loader (huggingface_hub's) refuses.
    """
    match = re.match(r"---\n(.*?)\n---\n", card_text, re.DOTALL)
    if match is None or "!!python/object/apply:pathlib." not in match.group(1):
        return card_text
    metadata = yaml.load(match.group(1), Loader=_PathsAsText)  # noqa: S506 - a safe loader plus one tag
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n" + card_text[match.end() :]


def write_model_card(directory: str | os.PathLike, config: Any) -> None:
    """Put the adapter's section (and tag) into ``directory/README.md``, creating the card if there is none."""
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory, CARD_NAME)
    if path.is_file():
        card = ModelCard(_paths_as_text(path.read_text(encoding="utf-8-sig")))
    else:  # an adapter saved in a subfolder: a card of this section alone
        card = ModelCard(f"---\n{ModelCardData(library_name='peft').to_yaml()}\n---\n")
    tags = list(card.data.tags or [])
    if TAG not in tags:
        card.data.tags = sorted([*tags, TAG])
    text = card.text
    if MARKER in text and END_MARKER in text:  # replace the previous section (the config may have changed since)
        start, end = text.index(MARKER), text.index(END_MARKER) + len(END_MARKER)
        text = text[:start] + text[end:]
    card.text = card_section(config) + "\n" + text.lstrip("\n")
    card.save(path)
