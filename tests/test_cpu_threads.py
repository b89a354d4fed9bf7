"""fastlm.cpu_threads: the rule that takes threads from fastlm's CPU layers while another
process shares the cores, driven by injected clocks (no timing in the test), and its scope
around every fastlm layer (fastlm.models and optimize()'d transformers models): the layer
runs at the governed count, the caller's count comes back, outputs do not change."""

from __future__ import annotations

import pytest
import torch

import fastlm
import fastlm.cpu_threads as ct
import fastlm.models as fm
from tests.models.util import padded_batch, tiny_bert_config, tiny_gpt2_config, transformers


class Clocks:
    """A wall clock and a process CPU clock the test advances by hand."""

    def __init__(self):
        self.wall_s = self.cpu_s = 0.0

    def run(self, wall_s: float, cores: float) -> None:
        self.wall_s += wall_s
        self.cpu_s += wall_s * cores


@pytest.fixture
def governor():
    clocks = Clocks()
    counts = []
    gov = ct.Governor(
        wall=lambda: clocks.wall_s, cpu=lambda: clocks.cpu_s, set_threads=counts.append
    )
    return gov, clocks, counts


@pytest.fixture
def auto(monkeypatch):
    """The rule on (the suite runs with it off: CI's two workers share two cores)."""
    monkeypatch.setattr(ct, "MODE", "auto")
    ct.GOVERNOR.reset()
    yield
    ct.GOVERNOR.reset()


def _layer(gov: ct.Governor, cores, wall_s: float = ct.WINDOW_S) -> int:
    """One layer (by default a whole window long) at the user's thread count as the rule
    sets it, getting ``cores`` cores' worth of CPU time (a number, or a function of the
    thread count it ran at); returns that thread count."""
    n = torch.get_num_threads()
    ran = gov.threads_for(n)
    got = cores(ran) if callable(cores) else cores
    gov.observe(n, ran, wall_s, wall_s * got)
    return ran


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_quiet_windows_keep_the_users_count(governor, two_threads):
    gov, _, _ = governor
    for cores in (2.0, 1.9, 1.72, 2.1):  # utilization 0.86-1.05: every thread on a core
        assert _layer(gov, cores) == 2
    assert gov.reduced_by == 0


def test_two_starved_windows_in_a_row_take_a_thread(governor, two_threads):
    gov, _, _ = governor
    assert _layer(gov, 1.3) == 2  # one starved window is not yet a neighbour
    assert _layer(gov, 1.95) == 2  # and a quiet one in between starts over
    assert _layer(gov, 1.3) == 2
    assert _layer(gov, 1.4) == 2
    assert gov.reduced_by == 1
    assert _layer(gov, 1.0) == 1  # the next layers run at one thread


def test_a_window_sums_its_layers(governor, two_threads):
    """One slow layer among quiet ones does not starve a window; layers of a busy machine
    do, however short (above MIN_WALL_S) each is."""
    gov, _, _ = governor
    for _ in range(ct.STARVED_IN_A_ROW):  # two slow layers in a row, 1.8 cores a window
        for cores in (1.2, 1.2, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0):
            _layer(gov, cores, ct.WINDOW_S / 8)
    assert gov.reduced_by == 0 and gov.starved == 0
    for _ in range(ct.STARVED_IN_A_ROW * 8):
        _layer(gov, 1.3, ct.WINDOW_S / 8)
    assert gov.reduced_by == 1


def test_the_threads_taken_are_the_cores_lost(governor):
    gov, _, _ = governor
    for _ in range(ct.STARVED_IN_A_ROW):
        gov.observe(8, 8, ct.WINDOW_S, ct.WINDOW_S * 5.6)  # 8 threads, 5.6 cores: 2.4 lost
    assert gov.reduced_by == 2
    assert gov.threads_for(8) == 6
    for _ in range(ct.STARVED_IN_A_ROW):
        gov.observe(4, 4, ct.WINDOW_S, ct.WINDOW_S * 0.2)  # never below one thread
    assert gov.reduced_by == 3 and gov.threads_for(4) == 1


def test_probes_at_the_users_count_and_gives_threads_back(governor, two_threads):
    gov, _, _ = governor

    def busy(ran):  # two threads with a neighbour: 1.2 cores; one thread: a core to itself
        return 1.2 if ran == 2 else 1.0

    for _ in range(ct.STARVED_IN_A_ROW):
        _layer(gov, busy)
    counts = [_layer(gov, busy) for _ in range(2 * (ct.PROBE_EVERY + 1))]
    # after PROBE_EVERY layers at one thread a window ran at two (a probe); starved, it
    # went back to one thread
    probes = [i for i, c in enumerate(counts) if c == 2]
    assert probes == [ct.PROBE_EVERY, 2 * ct.PROBE_EVERY + 1], counts
    assert gov.reduced_by == 1
    # the neighbour leaves: the next probe gets both cores and the count comes back
    counts = [_layer(gov, lambda ran: float(ran)) for _ in range(ct.PROBE_EVERY + 1)]
    assert counts[-1] == 2 and set(counts[:-1]) == {1} and gov.reduced_by == 0
    assert _layer(gov, 2.0) == 2


def test_short_layers_and_reduced_layers_are_not_judged(governor):
    gov, _, _ = governor
    for _ in range(round(4 * ct.WINDOW_S / ct.MIN_WALL_S)):
        gov.observe(2, 2, ct.MIN_WALL_S / 2, 0.0)  # too short to tell, however many
    assert gov.reduced_by == 0 and gov.starved == 0
    gov.reduced_by = 1
    gov.observe(2, 1, ct.WINDOW_S, ct.WINDOW_S)  # one thread: nothing about the second core
    assert gov.reduced_by == 1


def test_scope_sets_the_count_for_the_layer_and_restores_it(governor, two_threads, monkeypatch):
    monkeypatch.setattr(ct, "MODE", "auto")
    gov, clocks, counts = governor
    gov.reduced_by = 1
    x = torch.zeros(2)
    with gov.scope(x):
        clocks.run(0.01, 1.0)
    assert counts == [1, 2]  # one thread for the layer, the caller's two after it
    with pytest.raises(RuntimeError, match="inside"), gov.scope(x):
        raise RuntimeError("inside")
    assert counts[-1] == 2  # restored on an exception too


@pytest.mark.parametrize("case", ["off", "one thread", "meta device"])
def test_scope_leaves_the_count_alone(governor, two_threads, monkeypatch, case):
    gov, _, counts = governor
    gov.reduced_by = 1
    monkeypatch.setattr(ct, "MODE", "off" if case == "off" else "auto")
    if case == "one thread":
        torch.set_num_threads(1)
    x = torch.zeros(2, device="meta" if case == "meta device" else "cpu")
    with gov.scope(x):
        pass
    assert counts == []


def test_an_unknown_mode_is_an_error(governor, monkeypatch):
    monkeypatch.setattr(ct, "MODE", "fast")
    message = r"FASTLM_CPU_THREADS must be one of .*'fast'"
    with pytest.raises(ValueError, match=message), governor[0].scope(torch.zeros(1)):
        pass


def _spy_threads(monkeypatch) -> list[int]:
    """The intra-op thread count each fused FFN ran at."""
    seen = []
    real = fastlm.nn.GeluFFN.forward

    def forward(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fastlm.nn.GeluFFN, "forward", forward)
    return seen


def _models():
    torch.manual_seed(0)
    hf_bert = transformers.BertModel(tiny_bert_config()).eval()
    hf_gpt2 = transformers.GPT2LMHeadModel(tiny_gpt2_config()).eval()
    return {
        "fastlm-bert": (fm.BertModel(fm.BertConfig.from_hf(tiny_bert_config())).eval(), 61),
        "fastlm-gpt2": (fm.GPT2LMHeadModel(fm.GPT2Config.from_hf(tiny_gpt2_config())).eval(), 97),
        "optimized-bert": (fastlm.optimize(hf_bert), 61),
        "optimized-gpt2": (fastlm.optimize(hf_gpt2), 97),
    }


@pytest.mark.parametrize("name", ["fastlm-bert", "fastlm-gpt2", "optimized-bert", "optimized-gpt2"])
def test_every_layer_runs_at_the_governed_count(name, auto, two_threads, monkeypatch):
    """With the rule holding one thread back, each layer's FFN runs at one thread, the
    caller's count is back after the forward, and the outputs are the two-thread ones."""
    model, vocab = _models()[name]
    ids, mask = padded_batch(vocab, [5, 3], 5)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)[0]
        seen = _spy_threads(monkeypatch)
        ct.GOVERNOR.reduced_by = 1
        ct.GOVERNOR.since_probe = -100  # no probe inside this forward
        got = model(ids, attention_mask=mask)[0]
    assert seen and set(seen) == {1}, seen
    assert torch.get_num_threads() == 2
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-6, rtol=1e-6)


def test_a_layer_called_with_hidden_states_by_keyword_is_governed(auto, two_threads, monkeypatch):
    """transformers may hand a layer its hidden states by keyword: still one governed scope."""
    model = fastlm.optimize(transformers.BertModel(tiny_bert_config()).eval())
    layer = model.encoder.layer[0]
    seen = _spy_threads(monkeypatch)
    ct.GOVERNOR.reduced_by = 1
    ct.GOVERNOR.since_probe = -100
    with torch.no_grad():
        layer(hidden_states=torch.randn(2, 5, tiny_bert_config().hidden_size))
    assert seen == [1] and torch.get_num_threads() == 2
