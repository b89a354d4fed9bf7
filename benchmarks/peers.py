"""Other CPU runtimes timed beside fastlm on the encode workload: OpenVINO.

sentence-transformers reaches OpenVINO through ``backend="openvino"``, which needs
optimum-intel; its releases pin transformers < 5.6, so it cannot share a process with the
transformers this project tests. The runtime itself has no such pin: ``openvino_encoder``
converts the model's transformer with ``openvino.convert_model`` (the same PyTorch frontend
optimum-intel drives) and compiles it for the CPU, and ``with_openvino`` puts it under a
copy of the SentenceTransformer, so tokenization, batching, pooling and normalization stay
sentence-transformers' own and only the transformer's forward differs.

    pip install openvino     # the column appears; without it the encode row leaves it out
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# The inputs a BERT-style encoder takes, all (batch, seq) int64, both dimensions dynamic.
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OpenVINOEncoder(nn.Module):
    """A transformers encoder compiled by OpenVINO for the CPU, called like the encoder:
    ``(input_ids, attention_mask, token_type_ids) -> BaseModelOutput(last_hidden_state)``.

    ``precision`` is OpenVINO's ``INFERENCE_PRECISION_HINT`` ("f32", "bf16", "f16") or None
    for its default (bf16 where the CPU has a bf16 matrix unit, else f32); the precision it
    chose is ``self.precision``.
    """

    def __init__(self, encoder: nn.Module, precision: str | None = None):
        import openvino as ov

        super().__init__()
        self.config = encoder.config
        # Traced on a batch with padding: a mask of ones could let the model drop the mask.
        example = {name: torch.ones(2, 8, dtype=torch.long) for name in INPUTS}
        example["attention_mask"][1, 5:] = 0
        example["token_type_ids"].zero_()
        graph = ov.convert_model(
            encoder.float().eval(),
            example_input=example,
            input=[(name, [-1, -1], ov.Type.i64) for name in INPUTS],
        )
        config = {} if precision is None else {"INFERENCE_PRECISION_HINT": precision}
        self.compiled = ov.Core().compile_model(graph, "CPU", config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feed = {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "token_type_ids": token_type_ids.numpy(),
        }
        hidden = torch.from_numpy(self.compiled(feed)[0])
        return BaseModelOutput(last_hidden_state=hidden)


def with_openvino(st_model, precision: str | None = None):
    """A copy of a SentenceTransformer whose transformer runs on OpenVINO (see the module
    docstring); ``st_model`` is left as it was."""
    peer = copy.deepcopy(st_model).float()
    module = peer[0]
    module.model = OpenVINOEncoder(module.model, precision)
    return peer
