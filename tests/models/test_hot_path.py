"""The models' hot paths: the GPT-2 decode step reads nothing on the host, generate stops at
the same token as transformers while checking for the end only every few steps, every path
runs under torch.inference_mode() and torch.no_grad(), and on CUDA generate replays the
decode step from a CUDA graph with transformers' greedy tokens."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import fastlm.models as fm
from fastlm.models import generation
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")


@contextlib.contextmanager
def forbid_host_reads():
    """Every Tensor method that copies a value to the host raises inside the block.

    ``torch.compiler.is_compiling`` reports True as well: the checks that read values only
    where reading is free (eager CPU tensors, fastlm's and the ops') then take the branch
    they take on CUDA and under torch.compile, so what is tested is the CUDA step.
    """

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} in the decode step")

        return read

    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse(name)))
        stack.enter_context(mock.patch.object(torch.compiler, "is_compiling", lambda: True))
        yield


def _gpt2(backend="torch", **kw):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(**kw)).eval()
    return hf, fm.GPT2LMHeadModel.from_hf(hf, backend=backend)


def _prompts():
    torch.manual_seed(1)
    return padded_batch(97, [5, 2, 4], 5, left=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_step_reads_nothing_on_the_host(backend):
    """generate's decode steps run with every host read refused (the prefill before them
    checks the prompt on the host, which is free on CPU, and is not covered)."""
    hf, ours = _gpt2(backend)
    ids, mask = _prompts()
    step = ours.decode_step
    calls = []

    def guarded(*args, **kwargs):
        calls.append(1)
        with forbid_host_reads():
            return step(*args, **kwargs)

    with mock.patch.object(ours, "decode_step", guarded):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert len(calls) == 5  # every step after the prefill's token
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref), (got, ref)


def test_forbid_host_reads_bites():
    """The guard itself: a step with a host read fails under it."""
    with forbid_host_reads(), pytest.raises(AssertionError, match=r"Tensor\.item"):
        torch.ones(2).sum().item()
    with forbid_host_reads(), pytest.raises(AssertionError, match="__bool__"):
        bool(torch.ones(2).all())


class _StopAtLength(transformers.StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        stop = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


def test_generate_stops_where_transformers_does_between_end_checks():
    """Every row stops after 3 new tokens, between two of generate's every-8-steps checks:
    the output is cut there, as transformers' is, and a bounded number of extra steps ran."""
    hf, ours = _gpt2()
    ids, mask = _prompts()
    stop = transformers.StoppingCriteriaList([_StopAtLength(ids.shape[1] + 3)])
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = hf.generate(ids, stopping_criteria=stop, **kw)
    calls = []
    step = ours.decode_step

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    with mock.patch.object(ours, "decode_step", counted):
        got = ours.generate(ids, stopping_criteria=stop, output_scores=True,
                            return_dict_in_generate=True, **kw)  # fmt: skip
    assert torch.equal(got.sequences, ref), (got.sequences, ref)
    assert len(got.scores) == 3
    assert len(calls) == generation.EOS_CHECK_EVERY - 1  # stopped at the first check


def test_generate_refuses_right_padding():
    _, ours = _gpt2()
    ids, mask = padded_batch(97, [5, 2], 5)
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("flag", [True, False])
def test_use_cuda_graph_is_accepted_and_ignored_on_cpu(flag):
    hf, ours = _gpt2()
    ids, mask = _prompts()
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=4, use_cuda_graph=flag)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    with pytest.raises(TypeError, match="use_cuda_graph must be a bool"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=4, use_cuda_graph="yes")


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_bert_with_padding_under(mode):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    ours = fm.BertForSequenceClassification.from_hf(hf)
    ids, mask = padded_batch(61, [6, 3, 1], 6)
    with GRAD_MODES[mode]():
        got = ours(ids, attention_mask=mask)
        hidden = ours.bert(ids, attention_mask=mask, output_hidden_states=True)
        ref = hf(ids, attention_mask=mask).logits
    torch.testing.assert_close(got.logits, ref, atol=1e-5, rtol=1e-5)
    assert len(hidden.hidden_states) == 3
    assert (hidden.last_hidden_state[mask == 0] == 0).all()


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_gpt2_generate_and_forward_under(mode):
    hf, ours = _gpt2()
    ids, mask = _prompts()
    with GRAD_MODES[mode]():
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
        logits = ours(ids, attention_mask=mask).logits
        ref_logits = hf(ids, attention_mask=mask).logits
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref), (got, ref)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_generate_matches_transformers_greedy():
    """On CUDA, generate captures the decode step once and replays it for every later step;
    the greedy tokens are transformers', and those of the eager steps."""
    torch.manual_seed(0)
    # A large init makes the next token depend strongly on the context (no near-ties).
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(initializer_range=0.2)).eval().cuda()
    ours = fm.GPT2LMHeadModel.from_hf(hf)
    ids, mask = _prompts()
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    ref = hf.generate(ids, do_sample=False, **kw)

    replays = []
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays.append(1)
        return replay(graph)

    with mock.patch.object(torch.cuda.CUDAGraph, "replay", counted):
        graphed = ours.generate(ids, **kw)
    eager = ours.generate(ids, use_cuda_graph=False, **kw)
    torch.cuda.synchronize()
    # 12 tokens: the prefill's, one eager warm-up step, then 10 replays.
    assert len(replays) == 10
    assert torch.equal(graphed, eager), (graphed, eager)
    assert torch.equal(graphed, ref), (graphed, ref)
