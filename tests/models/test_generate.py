"""GPT2LMHeadModel.generate against transformers' generate on the same weights: defaults
from generation_config, eos and padding, every supported knob, sampling with the same
random stream, streamer, stopping criteria, scores; unsupported arguments raise."""

from __future__ import annotations

import pytest
import torch

import fastlm.models as fm
from tests.models.util import padded_batch, tiny_gpt2_config, transformers


def _pair(tmp_path, backend="torch", init=0.02, **gen):
    """An HF GPT-2 and fastlm's copy loaded from its saved directory (so generation
    defaults come from generation_config.json, as for a hub checkpoint). A large ``init``
    makes the next token depend strongly on the context (beam search's cache reordering)."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(initializer_range=init)).eval()
    for k, v in gen.items():
        setattr(hf.generation_config, k, v)
    hf.save_pretrained(tmp_path)
    return hf, fm.GPT2LMHeadModel.from_pretrained(tmp_path, backend=backend)


def _prompts():
    torch.manual_seed(1)
    return padded_batch(97, [5, 2, 4], 5, left=True)


def _first_greedy_token(hf, ids, mask):
    return int(hf.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                           pad_token_id=0)[0, -1])  # fmt: skip


# The torch backend only: generation_config's defaults are read above the kernels, and the
# triton decode path's parity has its own tests (test_gpt2's greedy and KV-cache ones); under
# the interpreter this one took 20 s of CI.
def test_defaults_from_generation_config_stop_at_eos_and_pad(tmp_path):
    hf0 = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    ids, mask = _prompts()
    torch.manual_seed(0)
    eos = _first_greedy_token(transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval(), ids, mask)
    del hf0
    hf, ours = _pair(tmp_path, "torch", eos_token_id=eos, pad_token_id=3, max_length=14)
    assert ours.generation_config.eos_token_id == eos
    ref = hf.generate(ids, attention_mask=mask)
    got = ours.generate(ids, attention_mask=mask)
    assert torch.equal(got, ref), (got, ref)
    assert (got[0, 5:] == eos).any() and (got == 3).any()  # stopped and padded after eos
    # Without an eos in sight, max_length (14) bounds the output.
    assert torch.equal(ours.generate(ids, attention_mask=mask, eos_token_id=[]),
                       hf.generate(ids, attention_mask=mask, eos_token_id=[]))  # fmt: skip


KNOBS = {
    "repetition_penalty": dict(repetition_penalty=1.7),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "min_new_tokens": dict(min_new_tokens=4, eos_token_id="first"),
    "max_length": dict(max_length=9),
    "max_new_tokens": dict(max_new_tokens=7),
    "all": dict(repetition_penalty=0.8, no_repeat_ngram_size=3, min_new_tokens=2, max_new_tokens=9),
}


@pytest.mark.parametrize("knob", list(KNOBS))
def test_greedy_knobs_match_transformers(tmp_path, knob):
    hf, ours = _pair(tmp_path)
    ids, mask = _prompts()
    kw = dict(KNOBS[knob], pad_token_id=0)
    if kw.get("eos_token_id") == "first":
        kw["eos_token_id"] = _first_greedy_token(hf, ids, mask)
    kw.setdefault("max_new_tokens", 8) if "max_length" not in kw else None
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = ours.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(got, ref), (knob, got, ref)


BEAMS = {
    "plain": dict(num_beams=3),
    "eos": dict(num_beams=3, eos_token_id="first"),
    "eos-long": dict(num_beams=3, eos_token_id="first", max_new_tokens=24),  # stops early
    "eos-return-2": dict(num_beams=4, eos_token_id="first", num_return_sequences=2),
    "length_penalty": dict(num_beams=3, eos_token_id="first", length_penalty=-0.5),
    "early_stopping": dict(num_beams=2, eos_token_id="first", early_stopping=True),
    "never": dict(num_beams=2, eos_token_id="first", early_stopping="never", length_penalty=2.0),
    "processors": dict(
        num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2
    ),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BEAMS))
def test_beam_search_matches_transformers(tmp_path, case, backend):
    # The backend serves the KV-cache attention of each beam step (beams reordered, some
    # ending at eos): "eos" covers that; the logits processors never reach the backend.
    if backend == "triton" and case != "eos":
        pytest.skip("the interpreter is slow; the eos case covers the triton path")
    hf, ours = _pair(tmp_path, backend, init=0.3)
    ids, mask = _prompts()
    kw = dict(dict(pad_token_id=0, max_new_tokens=7, do_sample=False), **BEAMS[case])
    if kw.get("eos_token_id") == "first":  # a token the search really meets
        kw["eos_token_id"] = int(hf.generate(ids, attention_mask=mask, max_new_tokens=3,
                                             num_beams=kw["num_beams"], pad_token_id=0)[1, -1])  # fmt: skip
    ref = hf.generate(ids, attention_mask=mask, **kw)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref), (case, got, ref)


def test_sampling_follows_the_same_random_stream_as_transformers(tmp_path):
    hf, ours = _pair(tmp_path)
    ids, mask = _prompts()
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6,
              num_return_sequences=2, pad_token_id=0, repetition_penalty=1.2)  # fmt: skip
    torch.manual_seed(5)
    ref = hf.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(5)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert got.shape == (6, 11) and torch.equal(got, ref)


def test_generator_makes_sampling_reproducible(tmp_path):
    _, ours = _pair(tmp_path)
    ids, mask = _prompts()

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return ours.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8,
                             top_k=None, generator=g)  # fmt: skip

    assert torch.equal(sample(11), sample(11))
    assert not torch.equal(sample(11), sample(12))


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_stopping_criteria_and_scores_match_transformers(tmp_path):
    hf, ours = _pair(tmp_path)
    ids, mask = _prompts()
    ids, mask = ids[:1], mask[:1]  # transformers' streamers take one sequence

    class StopOn(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == int(stop_token)

    stop_token = hf.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)[0, -1]
    runs = []
    for model in (hf, ours):
        rec = _Recorder()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, streamer=rec,
            stopping_criteria=transformers.StoppingCriteriaList([StopOn()]),
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        runs.append((out, rec.calls))
    (ref, ref_calls), (got, got_calls) = runs
    assert torch.equal(got.sequences, ref.sequences) and got.sequences.shape[1] < 5 + 8
    assert len(got.scores) == len(ref.scores) == got.sequences.shape[1] - 5
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert len(got_calls) == len(ref_calls) and got_calls[-1] == "end"
    for a, b in zip(got_calls[:-1], ref_calls[:-1]):
        assert torch.equal(a.reshape(-1), b.reshape(-1))


def test_unsupported_arguments_raise_naming_them(tmp_path):
    _, ours = _pair(tmp_path)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="beam sampling"):
        ours.generate(ids, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences=3 exceeds num_beams=2"):
        ours.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(TypeError, match=r"\['typical_p'\]"):
        ours.generate(ids, typical_p=0.5)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        ours.generate(ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="longer than max_length 2"):
        ours.generate(ids, max_length=2)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        ours.generate(ids, repetition_penalty=0.0)
    gc = transformers.GenerationConfig(max_new_tokens=2, do_sample=False)
    assert ours.generate(ids, generation_config=gc).shape == (1, 5)


# Edge values of the sampling knobs transformers accepts, with its meaning: top_k 0 or None
# and top_p None or >= 1 filter nothing, top_p 0 keeps only the most likely token,
# temperature None or 1 scales nothing; with do_sample=False none of them is used, whatever
# its value.
ACCEPTED_KNOBS = {
    "top_k=0": dict(do_sample=True, top_k=0),
    "top_k=None": dict(do_sample=True, top_k=None),
    "top_k>vocab": dict(do_sample=True, top_k=500),
    "top_p=0": dict(do_sample=True, top_p=0.0, top_k=None),
    "top_p=1.5": dict(do_sample=True, top_p=1.5),
    "top_p=None": dict(do_sample=True, top_p=None),
    "temperature=None": dict(do_sample=True, temperature=None),
    "temperature=1": dict(do_sample=True, temperature=1),
    "repetition_penalty=None": dict(do_sample=True, repetition_penalty=None),
    "greedy-temperature=0": dict(do_sample=False, temperature=0.0),
    "greedy-temperature<0": dict(do_sample=False, temperature=-1.0),
    "greedy-top_p=-1": dict(do_sample=False, top_p=-1.0),
    "greedy-top_k=-1": dict(do_sample=False, top_k=-1),
}


@pytest.mark.parametrize("case", list(ACCEPTED_KNOBS))
def test_sampling_knob_edge_values_mean_what_they_mean_in_transformers(tmp_path, case):
    hf, ours = _pair(tmp_path)
    ids, mask = _prompts()
    kw = dict(ACCEPTED_KNOBS[case], max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(5)
    ref = hf.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(5)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref), (case, got, ref)


@pytest.mark.parametrize(
    "knob,message",
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_sampling_knob_values_transformers_rejects_raise(tmp_path, knob, message):
    hf, ours = _pair(tmp_path)
    ids = torch.ones(1, 3, dtype=torch.long)
    kw = dict(knob, do_sample=True, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError):
        hf.generate(ids, **kw)
    with pytest.raises(ValueError, match=message):
        ours.generate(ids, **kw)


@pytest.mark.parametrize(
    "eos", [50256, -1, [50256, "first"], [-1, "first"]], ids=["above-vocab", "negative",
                                                               "above-and-real", "negative-and-real"]
)  # fmt: skip
@pytest.mark.parametrize("mode", ["greedy", "min_new_tokens", "beams"])
def test_eos_outside_the_vocabulary_is_never_generated(tmp_path, eos, mode):
    """GPT-2's default eos (50256) with a small vocabulary, or a negative id: transformers
    accepts both and never stops on them; an id inside the vocabulary beside them still
    stops generation."""
    hf, ours = _pair(tmp_path, init=0.3)
    ids, mask = _prompts()
    first = _first_greedy_token(hf, ids, mask)
    eos = [first if t == "first" else t for t in eos] if isinstance(eos, list) else eos
    kw = dict(eos_token_id=eos, pad_token_id=0, max_new_tokens=7, do_sample=False)
    if mode == "min_new_tokens":
        kw["min_new_tokens"] = 3
    if mode == "beams":
        kw["num_beams"] = 2
    ref = hf.generate(ids, attention_mask=mask, **kw)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref), (got, ref)


def test_default_eos_outside_a_small_vocabulary(tmp_path):
    """A config keeping GPT-2's default eos/bos (50256) with a 97-token vocabulary: generate
    runs to max_new_tokens and pads nothing, as transformers does."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(tiny_gpt2_config(eos_token_id=50256, bos_token_id=50256))
    hf.eval().save_pretrained(tmp_path)
    ours = fm.GPT2LMHeadModel.from_pretrained(tmp_path)
    ids, mask = _prompts()
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(got, ref) and got.shape == (3, 10)
    fresh = fm.GPT2LMHeadModel(fm.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)).eval()
    assert fresh.generate(torch.ones(1, 2, dtype=torch.long), max_new_tokens=3).shape == (1, 5)


def test_finished_rows_padded_with_an_eos_outside_the_vocabulary(tmp_path):
    """No pad_token_id: finished rows are padded with eos[0], as transformers pads them, even
    where that id (50256) lies outside the vocabulary; it is written, never embedded
    (transformers raises an IndexError embedding it)."""
    hf, ours = _pair(tmp_path, init=0.3)
    ids, mask = _prompts()
    first = _first_greedy_token(hf, ids, mask)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = hf.generate(ids, eos_token_id=first, pad_token_id=0, **kw)
    got = ours.generate(ids, eos_token_id=[50256, first], **kw)
    new = ref[:, 5:]
    finished = (new == first).long().cumsum(1) - (new == first).long() > 0  # after the eos
    assert finished.any()
    assert torch.equal(got[:, :5], ids)
    assert torch.equal(got[:, 5:], new.masked_fill(finished, 50256))
