"""python -m fastlm info / check."""

import fastlm.__main__ as cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends on this device" in out
    for op in cli.OPS:
        assert op in out


def test_check_prints_a_pass_table(capsys):
    assert cli.main(["check", "layer_norm"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "triton" in out and "pass" in out
    assert "FAIL" not in out and "ERROR" not in out
    assert "all checks passed" in out


def test_check_unknown_op(capsys):
    assert cli.main(["check", "softmax"]) == 2
    assert "unknown op" in capsys.readouterr().out
