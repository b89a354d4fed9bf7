"""python -m fastlm demo: every path is in the table, parity holds, and the timing is honest."""

import re
import types

import pytest
import torch

import fastlm.__main__ as cli
from fastlm.demo import bert, gpt2, timing
from fastlm.demo.table import Row, format_table
from tests.conftest import ON_GPU
from tests.models.util import minilm_dir

# fp32 on CPU: the same arithmetic up to summation order. fp16 on a GPU: a random tiny GPT-2
# has near-tied logits, so a rounding difference may flip one greedy token.
MAX_DIFF, MIN_COS, MIN_AGREE = (2e-2, 0.999, 0.75) if ON_GPU else (1e-4, 0.99999, 1.0)


def _table(out: str) -> dict[str, list[str]]:
    """The demo's table rows by path: the cells, split on the two-space column gaps."""
    paths = (*bert.PATHS, *gpt2.PATHS)
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in paths:
            rows[cells[0]] = cells
    return rows


def _ms(cell: str) -> float:
    return float(re.match(r"([\d.]+) ms", cell).group(1))


def test_demo_reports_every_path_with_parity_and_speed(capsys):
    minilm_dir()  # skips without the MiniLM weights
    assert cli.main(["demo", "--quick", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "median of 2 runs after one warm-up" in out
    padding = re.search(
        r"sentences of 3-\d+ words -> a padded batch of .*, (\d+)% of it padding", out
    )
    assert padding and 40 <= int(padding.group(1)) <= 80, out

    rows = _table(out)
    assert set(rows) == {*bert.PATHS, *gpt2.PATHS}, out
    for path in bert.PATHS:
        _, parity, ours, theirs, speedup = rows[path]
        diff, cos = re.fullmatch(r"max\|diff\| (\S+), cos (\S+)", parity).groups()
        assert float(diff) <= MAX_DIFF and float(cos) >= MIN_COS, rows[path]
        assert float(speedup[:-1]) == pytest.approx(_ms(theirs) / _ms(ours), rel=0.02, abs=0.01)
    new_tokens = int(re.search(r"(\d+) new tokens per prompt", out).group(1))
    for path, batch in zip(gpt2.PATHS, (1, 4)):
        _, parity, ours, theirs, speedup = rows[path]
        agree = float(re.fullmatch(r"tokens agree ([\d.]+)%", parity).group(1)) / 100
        assert agree >= MIN_AGREE, rows[path]
        for cell in (ours, theirs):
            ms, tok_s = map(float, re.fullmatch(r"([\d.]+) ms = ([\d.]+) tok/s", cell).groups())
            assert tok_s == pytest.approx(batch * new_tokens / ms * 1e3, rel=0.05), rows[path]
        assert float(speedup[:-1]) == pytest.approx(_ms(theirs) / _ms(ours), rel=0.05, abs=0.01)
    # the baseline is timed once per input: every BERT row divides the same sdpa time
    assert len({rows[path][3] for path in bert.PATHS}) == 1


def test_bert_paths_are_what_their_rows_say():
    import fastlm.models
    import fastlm.nn

    models = bert.load_models(minilm_dir(), torch.device("cpu"), torch.float32)
    assert set(models) == {"sdpa", *bert.PATHS}

    def fastlm_modules(model):
        return [
            m for m in model.modules() if isinstance(m, (fastlm.nn.LayerNorm, fastlm.nn.GeluFFN))
        ]

    baseline = models["sdpa"]  # stock transformers: optimize() must not have touched it
    assert baseline.config._attn_implementation == "sdpa" and not fastlm_modules(baseline)
    assert isinstance(models[bert.PATHS[0]], fastlm.models.BertModel)
    as_fastlm = models[bert.PATHS[1]]
    assert as_fastlm.config._attn_implementation == "fastlm" and not fastlm_modules(as_fastlm)
    assert fastlm_modules(models[bert.PATHS[2]])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "0"], "expected a whole number >= 1, got 0"),
        (["--runs", "five"], "expected a whole number >= 1, got 'five'"),
        (["--new-tokens", "-3"], "expected a whole number >= 1, got -3"),
        (["--backend", "fast"], "invalid choice: 'fast'"),
        (["--sentences", "3"], "unrecognized arguments: --sentences 3"),
    ],
)
def test_demo_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_time_calls_warms_up_untimed_alternates_and_takes_the_median(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    order = []
    seconds = {"a": iter([100.0, 0.009, 0.001, 0.002]), "b": iter([100.0, 0.004, 0.004, 0.005])}

    def call(name):
        def run():
            order.append(name)
            now[0] += next(seconds[name])  # the first (warm-up) call is slow: never counted
            return f"{name} out"

        return run

    results, ms = timing.time_calls({"a": call("a"), "b": call("b")}, 3, torch.device("cpu"))
    assert results == {"a": "a out", "b": "b out"}
    assert order == ["a", "b"] * 4  # warm-up round, then round-robin
    assert ms == pytest.approx({"a": 2.0, "b": 4.0})  # medians, not means
    with pytest.raises(ValueError, match="runs must be >= 1, got 0"):
        timing.time_calls({"a": call("a")}, 0, torch.device("cpu"))


def test_bert_parity_reads_valid_tokens_only():
    ref = torch.zeros(2, 4, 8)
    ref[..., 0] = 1.0
    got = ref.clone()
    got[0, 1, 3] = 0.25  # a valid token off by 0.25
    got[1, 3] = 1e3  # padding: must not count
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    diff, cos = re.fullmatch(r"max\|diff\| (\S+), cos (\S+)", bert.parity(got, ref, mask)).groups()
    assert float(diff) == 0.25
    assert float(cos) == pytest.approx(1 / (1 + (0.25 / 3) ** 2) ** 0.5, abs=1e-6)


def test_gpt2_agreement_counts_only_generated_tokens_and_missing_ones():
    ref = torch.tensor([[7, 7, 1, 2, 3, 4], [7, 7, 5, 6, 7, 8]])
    got = ref.clone()
    got[:, :2] = 0  # the prompt differs: not counted
    assert gpt2.agreement(got, ref, 2) == 1.0
    got[1, 5] = 0
    assert gpt2.agreement(got, ref, 2) == 7 / 8
    assert gpt2.agreement(got[:, :4], ref, 2) == 4 / 8  # two generated tokens missing per row


def test_table_columns_line_up_and_split_back():
    rows = [Row("a path", "tokens agree 100.0%", 250.0, 500.0, tokens=8), Row("b", "x", 2.0, 1.0)]
    lines = format_table(rows).splitlines()
    assert [re.split(r"\s{2,}", line) for line in (lines[2], lines[3])] == [
        [
            "a path",
            "tokens agree 100.0%",
            "250.0 ms = 32.0 tok/s",
            "500.0 ms = 16.0 tok/s",
            "2.00x",
        ],
        ["b", "x", "2.0 ms", "1.0 ms", "0.50x"],
    ]
    assert len({len(line) for line in lines}) == 1  # right-aligned last column: equal widths
