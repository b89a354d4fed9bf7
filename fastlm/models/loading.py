"""Checkpoint loading from a local Hugging Face model directory, without transformers.

A directory holds ``config.json`` and ``model.safetensors`` (preferred) or
``pytorch_model.bin``. Checkpoint key prefixes differ by how a model was saved: a bare
``BertModel`` has ``embeddings.*``, a task model ``bert.embeddings.*``; GPT-2 checkpoints
may or may not carry ``transformer.``. :func:`load_into` maps keys onto the module's own
names, drops buffers that old transformers versions saved (``position_ids``, GPT-2's
``attn.bias``/``attn.masked_bias``), and refuses missing, unexpected or mis-shaped weights
with a message listing them.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")

# Non-parameter buffers some checkpoints contain; the fastlm modules recompute them.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids|attn\.bias|attn\.masked_bias)$")


def resolve_dir(path: str | os.PathLike, model: str) -> tuple[str, str]:
    """(config.json path, weights path) of a checkpoint directory, or a clear ValueError."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"{model}.from_pretrained: {path!r} is not a directory (a local checkpoint dir is expected)"
        )
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        raise ValueError(f"{model}.from_pretrained: no {CONFIG_NAME} in {path!r}")
    for name in WEIGHT_NAMES:
        w = os.path.join(path, name)
        if os.path.isfile(w):
            return cfg, w
    raise ValueError(
        f"{model}.from_pretrained: no weights in {path!r}; expected one of {list(WEIGHT_NAMES)}"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or a torch .bin file (weights_only: no code is unpickled)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with the test extras
            raise ImportError(f"reading {path} needs the safetensors package") from exc
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(
            f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}"
        )
    return sd


def _remap(
    sd: dict[str, torch.Tensor], own: set[str], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Match checkpoint keys to the module's keys by adding or removing one known prefix.

    A backbone loading a task checkpoint (BertModel from BertForMaskedLM's ``bert.*`` +
    ``cls.*``) keeps the prefixed keys and drops the head's, as transformers does.
    """
    for p in prefixes:
        if any(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in own):
            sd = {k: v for k, v in sd.items() if k.startswith(p) or _IGNORED.search(k)}
    out = {}
    for k, v in sd.items():
        if _IGNORED.search(k):
            continue
        if k in own:
            out[k] = v
            continue
        for p in prefixes:
            if k.startswith(p) and k[len(p) :] in own:
                out[k[len(p) :]] = v
                break
            if p + k in own:
                out[p + k] = v
                break
        else:
            out[k] = v  # reported as unexpected below
    return out


def load_into(
    module: nn.Module, sd: dict[str, torch.Tensor], prefixes: tuple[str, ...], where: str
) -> None:
    """Copy ``sd`` into ``module`` strictly, with a readable error on any mismatch.

    Tied weights (GPT-2's lm_head, BERT's MLM decoder) are filled from their source key
    when the checkpoint omits them.
    """
    own = module.state_dict()
    sd = _remap(sd, set(own), prefixes)
    ties = getattr(module, "_tied_keys", {})
    for dst, src in ties.items():
        if dst not in sd and src in sd:
            sd[dst] = sd[src]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)} key(s): {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} key(s): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    if shapes:
        problems.append(f"shape mismatch (config and weights disagree): {shapes[:8]}")
    if problems:
        raise ValueError(f"{where}: the checkpoint does not fit the model: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)
