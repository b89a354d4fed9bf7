"""Checkpoint loading from a local Hugging Face model directory, without transformers.

A directory holds ``config.json`` and weights in one of the layouts the hub ships:
``model.safetensors``, ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (sharded; read with ``weights_only=True``, so no code is
unpickled). Key names differ by how and when a model was saved:

* prefixes: a bare ``BertModel`` has ``embeddings.*``, a task model ``bert.embeddings.*``;
  GPT-2 checkpoints (``openai-community/gpt2``) are bare ``GPT2Model`` keys, task models
  carry ``transformer.``;
* legacy names: the original BERT checkpoints call LayerNorm parameters ``gamma``/``beta``;
* buffers old transformers versions saved (``position_ids``, GPT-2's ``attn.bias`` and
  ``attn.masked_bias``) are dropped: the fastlm modules recompute them;
* tied weights (GPT-2's ``lm_head``, BERT's MLM decoder) may be absent: they are filled from
  their source.

:func:`load_into` then loads strictly on everything the checkpoint has. Parameters it does not
have (a classifier on a base checkpoint) keep the model's HF-style initialisation and are
listed in ONE warning, as transformers does; checkpoint keys of parts the model does not have
(an MLM head under a classifier) are listed in the same warning. A checkpoint that fills none
of the model's weights, whose shapes disagree with the config, or that has weights inside the
model's own modules the model lacks (more layers than the config says) is an error.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch
from torch import nn

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS = "model.safetensors"
# In the order transformers prefers them.
WEIGHT_NAMES = (
    SAFE_WEIGHTS,
    SAFE_WEIGHTS + ".index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Non-parameter buffers some checkpoints contain; the fastlm modules recompute them.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids|attn\.bias|attn\.masked_bias)$")
# Legacy (TF-era) LayerNorm parameter names -> torch names.
_LEGACY = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


def resolve_dir(path: str | os.PathLike, model: str) -> tuple[str, str]:
    """(config.json path, weights path or shard index path) of a checkpoint directory."""
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


def _read_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors of one .safetensors or torch .bin file; any read failure names the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:  # pragma: no cover - safetensors ships with the test extras
        raise ImportError(f"reading {path} needs the safetensors package") from exc
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot read the checkpoint file (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(sd, dict):
        raise ValueError(
            f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}"
        )
    return sd


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of every shard an ``*.index.json`` lists."""
    if not path.endswith(".index.json"):
        return _read_file(path)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a shard index (a JSON object with a 'weight_map')") from exc
    folder = os.path.dirname(path)
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(f"{path}: lists shard {shard!r}, which is not in {folder!r}")
        sd.update(_read_file(shard_path))
    return sd


def _rename_legacy(key: str) -> str:
    for pattern, new in _LEGACY:
        key = pattern.sub(new, key)
    return key


def _remap(
    sd: dict[str, torch.Tensor], own: set[str], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Match checkpoint keys to the module's keys: legacy names renamed, ignored buffers
    dropped, one known prefix added or removed.

    A backbone loading a task checkpoint (BertModel from BertForMaskedLM's ``bert.*`` +
    ``cls.*``) keeps the prefixed keys and drops the head's, as transformers does.
    """
    sd = {_rename_legacy(k): v for k, v in sd.items() if not _IGNORED.search(k)}
    for p in prefixes:
        if any(k.startswith(p) for k in sd) and not any(k.startswith(p) for k in own):
            sd = {k: v for k, v in sd.items() if k.startswith(p)}
    out = {}
    for k, v in sd.items():
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
            out[k] = v  # reported as unused below
    return out


def _listing(keys: list[str]) -> str:
    return f"{keys[:12]}{' ...' if len(keys) > 12 else ''}"


def _foreign(module: nn.Module, key: str) -> bool:
    """Whether checkpoint ``key`` belongs to a part this model does not have (another task's
    head, a pooler): True. False when it names a slot inside the model's own parts (a layer
    past the config's count, a parameter a module does not have): the config is wrong."""
    *owners, _ = key.split(".")
    m = module
    for part in owners:
        child = m._modules.get(part)
        if child is None:
            return not isinstance(m, nn.ModuleList)
        m = child
    return False


def load_into(
    module: nn.Module, sd: dict[str, torch.Tensor], prefixes: tuple[str, ...], where: str
) -> None:
    """Copy ``sd`` into ``module``: what matches is loaded strictly, the rest is warned about."""
    own = module.state_dict()
    sd = _remap(sd, set(own), prefixes)
    for dst, src in getattr(module, "tied_weights", lambda: {})().items():
        if dst not in sd and src in sd:
            sd[dst] = sd[src]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if shapes:
        raise ValueError(
            f"{where}: the checkpoint does not fit the model: shape mismatch (config and "
            f"weights disagree): {shapes[:8]}"
        )
    loaded = {k: v for k, v in sd.items() if k in own}
    if not loaded:
        raise ValueError(
            f"{where}: the checkpoint has none of the model's weights (another architecture?); "
            f"checkpoint keys: {_listing(sorted(sd))}"
        )
    unused = sorted(set(sd) - set(own))
    unexpected = [k for k in unused if not _foreign(module, k)]
    if unexpected:
        raise ValueError(
            f"{where}: the checkpoint does not fit the model (config and weights disagree): "
            f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}"
        )
    missing = sorted(set(own) - set(loaded))
    notes = []
    if missing:
        notes.append(
            f"{len(missing)} weight(s) are not in the checkpoint and were newly initialised "
            f"(train the model before using it): {_listing(missing)}"
        )
    if unused:
        notes.append(f"{len(unused)} checkpoint weight(s) were not used: {_listing(unused)}")
    if notes:
        warnings.warn(f"{where}: " + "; ".join(notes), stacklevel=3)
    module.load_state_dict(loaded, strict=False)
