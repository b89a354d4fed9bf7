"""fastlm.optimize() on every transformers family it declares (families.py) besides BERT and
GPT-2, whose own tests are test_hf.py and test_optimize_coverage.py: RoBERTa, XLM-RoBERTa,
CamemBERT, ELECTRA, DistilBERT, ALBERT, MPNet and GPT-BigCode. Tiny random models (CPU,
fp32) against the same transformers model un-optimized: every task head's outputs on valid
tokens, losses and parameter gradients; revert; torch.save; the padding skipped; the torch,
reference and Triton (interpreter) backends; attn_implementation="fastlm" served or refused
at load time; GPT-BigCode's generate (greedy, beam, sampling), multi-query and not."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

import fastlm
from fastlm import backends
from fastlm.ops import linear as linear_module
from tests.models.util import assert_grads_close, padded_batch, param_grads, transformers

T = transformers
ATOL, RTOL = 2e-5, 1e-4
VOCAB = 61
# At the default initializer_range (0.02) a tiny model's attention barely moves its outputs;
# at 0.2 a wrong mask or a dropped residual moves them by ~1.
INIT = dict(initializer_range=0.2)
_ENC = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=48,
            vocab_size=VOCAB, max_position_embeddings=40, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **INIT)  # fmt: skip
_ROBERTA = dict(_ENC, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _configs() -> dict:
    return {
        "roberta": T.RobertaConfig(**_ROBERTA),
        "xlm-roberta": T.XLMRobertaConfig(**_ROBERTA),
        "camembert": T.CamembertConfig(**_ROBERTA),
        "electra": T.ElectraConfig(**_ENC, embedding_size=16),
        "distilbert": T.DistilBertConfig(
            dim=32,
            n_heads=2,
            n_layers=2,
            hidden_dim=48,
            vocab_size=VOCAB,
            max_position_embeddings=40,
            dropout=0.0,
            attention_dropout=0.0,
            **INIT,
        ),
        # three layers sharing one AlbertLayer object; ALBERT's default activation is gelu_new
        "albert": T.AlbertConfig(
            **dict(_ENC, num_hidden_layers=3),
            embedding_size=16,
            num_hidden_groups=1,
            inner_group_num=1,
        ),
        "mpnet": T.MPNetConfig(**_ROBERTA),
        "gpt-bigcode": T.GPTBigCodeConfig(
            n_embd=32,
            n_head=2,
            n_layer=2,
            vocab_size=VOCAB,
            n_positions=40,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **INIT,
        ),
    }


CONFIGS = _configs()
FAMILIES = list(CONFIGS)
ENCODERS = [f for f in FAMILIES if f != "gpt-bigcode"]
FUSED_ATTENTION = [f for f in ENCODERS if f != "mpnet"]  # MPNet: relative position bias

HEADS = {
    "roberta": ["Model", "ForSequenceClassification", "ForTokenClassification",
                "ForQuestionAnswering", "ForMaskedLM", "ForMultipleChoice", "ForCausalLM"],
    # transformers' XLM-RoBERTa and CamemBERT modeling files are copies of RoBERTa's (the
    # same heads, line for line): their backbone and two heads, RoBERTa's every head
    "xlm-roberta": ["Model", "ForSequenceClassification", "ForMaskedLM"],
    "camembert": ["Model", "ForQuestionAnswering", "ForCausalLM"],
    "electra": ["Model", "ForSequenceClassification", "ForTokenClassification",
                "ForQuestionAnswering", "ForMaskedLM", "ForMultipleChoice", "ForPreTraining",
                "ForCausalLM"],
    "distilbert": ["Model", "ForSequenceClassification", "ForTokenClassification",
                   "ForQuestionAnswering", "ForMaskedLM", "ForMultipleChoice"],
    "albert": ["Model", "ForSequenceClassification", "ForTokenClassification",
               "ForQuestionAnswering", "ForMaskedLM", "ForMultipleChoice", "ForPreTraining"],
    "mpnet": ["Model", "ForSequenceClassification", "ForTokenClassification",
              "ForQuestionAnswering", "ForMaskedLM", "ForMultipleChoice"],
    "gpt-bigcode": ["Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification"],
}  # fmt: skip
PREFIX = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
          "electra": "Electra", "distilbert": "DistilBert", "albert": "Albert", "mpnet": "MPNet",
          "gpt-bigcode": "GPTBigCode"}  # fmt: skip
CASES = [(family, head) for family in FAMILIES for head in HEADS[family]]


def _model(family: str, head: str = "Model", **config_changes):
    config = copy.deepcopy(CONFIGS[family])
    for key, value in config_changes.items():
        setattr(config, key, value)
    if head == "ForCausalLM" and family != "gpt-bigcode":
        config.is_decoder = True
    torch.manual_seed(0)
    return getattr(T, PREFIX[family] + head)(config).eval()


def _twins(model):
    """(reference, optimized): the same weights; the reference on transformers' default
    attention (sdpa, or eager where that is all the model runs)."""
    return model, fastlm.optimize(copy.deepcopy(model))


def _batch(family: str, lengths=(9, 5, 2), seq: int = 9):
    """Right-padded ids and mask; ids avoid the pad id (RoBERTa-likes derive positions
    from it) and, for decoders, the ids are any token."""
    return padded_batch(VOCAB, list(lengths), seq, low=3)


def _inputs(family: str, head: str) -> tuple[dict, torch.Tensor | None]:
    """The head's inputs with labels, and the mask selecting the valid positions of its
    first output (None: compare all of it)."""
    ids, mask = _batch(family)
    batch = ids.shape[0]
    inputs = dict(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    if head == "ForMultipleChoice":
        ids2, mask2 = _batch(family, (4, 9, 6))
        inputs = dict(input_ids=torch.stack([ids, ids2], 1), attention_mask=torch.stack([mask, mask2], 1),
                      labels=torch.tensor([0, 1, 1]))  # fmt: skip
        valid = None
    elif head == "ForSequenceClassification":
        inputs["labels"] = torch.tensor([0, 1, 1])
        valid = None
    elif head == "ForTokenClassification":
        inputs["labels"] = torch.randint(0, 2, ids.shape).masked_fill(mask == 0, -100)
    elif head == "ForQuestionAnswering":
        inputs.update(
            start_positions=torch.tensor([1, 2, 0]), end_positions=torch.tensor([3, 4, 1])
        )
    elif head in ("ForMaskedLM", "ForCausalLM"):
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif head == "ForPreTraining":
        if family == "albert":
            inputs.update(
                labels=ids.masked_fill(mask == 0, -100),
                sentence_order_label=torch.tensor([0, 1, 0]),
            )
        else:  # ELECTRA's discriminator: which tokens were replaced
            inputs["labels"] = torch.randint(0, 2, ids.shape)
    assert batch == 3
    return inputs, valid


def _first(output) -> torch.Tensor:
    for key in ("logits", "start_logits", "prediction_logits", "last_hidden_state"):
        if key in output:
            return output[key]
    raise AssertionError(f"no output to compare among {list(output.keys())}")


def _run(model, inputs: dict, valid):
    """The first output and the parameter gradients of the loss (of the output's squares on
    valid positions for a bare model)."""
    model.zero_grad()
    out = model(**inputs)
    first = _first(out)
    picked = first if valid is None else first[valid]
    loss = out.loss if out.get("loss") is not None else picked.square().sum()
    loss.backward()
    return picked.detach(), loss.detach(), param_grads(model)


def _fused_names(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FastLM")}


@pytest.mark.parametrize(("family", "head"), CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_every_head_matches_transformers(family, head):
    ref, fast = _twins(_model(family, head))
    assert _fused_names(fast), "nothing changed class"
    inputs, valid = _inputs(family, head)
    want, want_loss, want_grads = _run(ref, inputs, valid)
    got, got_loss, got_grads = _run(fast, inputs, valid)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_loss, want_loss, atol=ATOL, rtol=RTOL)
    assert_grads_close(got_grads, want_grads)


def _ops_run() -> set[str]:
    return {key[0] for key in backends._DECISIONS}


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 8, 9), (9, 3, 2)], ids=["full", "4%", "48%"])
def test_encoders_run_fused_and_skip_padding(family, lengths, monkeypatch):
    """On eager CPU a batch with enough padding runs on its valid tokens (attention_varlen;
    MPNet packs its FFN, its attention stays transformers'); a full or little-padded batch
    runs the padded layout."""
    from fastlm.integrations.hf import fused_layers

    packs = []
    real = fused_layers.unpad_input
    monkeypatch.setattr(fused_layers, "unpad_input", lambda *a: packs.append(1) or real(*a))
    ref, fast = _twins(_model(family))
    ids, mask = _batch(family, lengths)
    backends.forget_decisions()
    with torch.no_grad():
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)
    ops = _ops_run()
    assert {"layer_norm", "gelu_ffn"} <= ops
    assert bool(packs) is (lengths == (9, 3, 2))
    if family not in FUSED_ATTENTION:
        assert not ops & {"attention", "attention_varlen"}
    else:
        assert ("attention_varlen" in ops) is bool(packs)


def test_mpnet_packs_only_a_padding_mask():
    """A 4-D mask whose query rows differ is not a padding mask: MPNet's FFN then runs on
    the padded batch, and the result is still transformers'."""
    ref, fast = _twins(_model("mpnet"))
    ids, mask = _batch("mpnet", (9, 3, 2))
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, 9, -1).clone()
    allowed[:, :, 0, 1] = False  # the first query may not see the second token
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        got = fast(input_ids=ids, attention_mask=additive).last_hidden_state
        want = ref(input_ids=ids, attention_mask=additive).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# one family per code path: XLM-RoBERTa and CamemBERT run RoBERTa's
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("xlm-roberta", "camembert")])
def test_backends_match_transformers(family, backend):
    """fastlm's reference ops and its Triton kernels (through the interpreter on CPU)."""
    ref, fast = _twins(_model(family))
    ids, mask = _batch(family)
    fastlm.set_backend(backend)
    try:
        with torch.no_grad():
            got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        fastlm.set_backend(None)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_and_torch_save(family):
    head = "ForCausalLM" if family == "gpt-bigcode" else "ForMaskedLM"
    model = _model(family, head)
    classes = [type(m) for m in model.modules()]
    ids, mask = _batch(family)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits

    before = logits(model)
    fastlm.optimize(model)
    assert not [m for m in model.modules() if type(m) is nn.Linear], "a plain nn.Linear is left"
    optimized = logits(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _fused_names(loaded) == _fused_names(model)
    assert torch.equal(logits(loaded), optimized)
    fastlm.revert(loaded)
    fastlm.revert(model)
    assert [type(m) for m in model.modules()] == classes
    assert torch.equal(logits(model), before)
    assert torch.equal(logits(loaded), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_fastlm_is_served_or_refused(family):
    """Loaded with attn_implementation="fastlm": a padded batch as transformers' sdpa
    computes it, or (MPNet, whose attention never reaches an attention function) a
    ValueError when the model is built."""
    config = copy.deepcopy(CONFIGS[family])
    model_class = getattr(T, PREFIX[family] + "Model")
    if family == "mpnet":
        with pytest.raises(ValueError, match='does not support attn_implementation="fastlm"'):
            model_class._from_config(config, attn_implementation="fastlm")
        with pytest.raises(ValueError, match=r"fastlm\.optimize"):
            T.AutoModel.from_config(config, attn_implementation="fastlm")
        return
    torch.manual_seed(0)
    fast = model_class._from_config(config, attn_implementation="fastlm").eval()
    assert fast.config._attn_implementation == "fastlm"
    ref = copy.deepcopy(fast)
    ref.set_attn_implementation("sdpa")
    ids, mask = _batch(family)
    with torch.no_grad():
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["distilbert", "albert", "mpnet", "roberta"])
def test_calls_the_fused_attention_cannot_serve(family):
    """output_attentions and a 4-D mask run transformers' attention, exactly as stock
    eager attention (the implementation that returns probabilities)."""
    ref, fast = _twins(_model(family))
    ref.set_attn_implementation("eager")
    ids, mask = _batch(family)
    # a 4-D mask as eager attention takes it: additive, 0 where allowed
    four_d = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    four_d = four_d.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for kw in ({"attention_mask": mask, "output_attentions": True}, {"attention_mask": four_d}):
            got, want = fast(input_ids=ids, **kw), ref(input_ids=ids, **kw)
            valid = mask.bool()
            torch.testing.assert_close(
                got.last_hidden_state[valid], want.last_hidden_state[valid], atol=ATOL, rtol=RTOL
            )
            if kw.get("output_attentions"):
                for a, b in zip(got.attentions, want.attentions, strict=True):
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_mpnet_logs_what_stays_transformers(caplog):
    from fastlm.integrations.hf import log

    log._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastlm"):
        model = fastlm.optimize(_model("mpnet"))
    assert "relative position bias" in caplog.text
    assert model.config._attn_implementation != "fastlm"


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 3, 2)], ids=["full", "48%"])
def test_gpt_bigcode_mlp_runs_on_the_valid_rows(lengths, monkeypatch):
    """The MLPs of a padded prefill run on the valid rows (the mask reaches them from the
    backbone's forward hook); a decode step, whose mask spans the cache, runs unpacked; the
    hook goes with revert."""
    from fastlm.integrations.hf import fused_layers

    packs = []
    real = fused_layers.unpad_input
    monkeypatch.setattr(fused_layers, "unpad_input", lambda *a: packs.append(1) or real(*a))
    ref, fast = _twins(_model("gpt-bigcode", "ForCausalLM"))
    ids, mask = _batch("gpt-bigcode", lengths)
    with torch.no_grad():
        got = fast(input_ids=ids, attention_mask=mask, use_cache=True)
        want = ref(input_ids=ids, attention_mask=mask, use_cache=True)
        valid = mask.bool()
        torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=ATOL, rtol=RTOL)
        assert len(packs) == (2 if lengths == (9, 3, 2) else 0)  # one per layer
        step = torch.full((3, 1), 5)
        longer = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        packs.clear()
        got = fast(input_ids=step, attention_mask=longer, past_key_values=got.past_key_values)
        want = ref(input_ids=step, attention_mask=longer, past_key_values=want.past_key_values)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=RTOL)
    assert not packs
    backbone = fast.transformer
    assert len(backbone._forward_pre_hooks) == 1
    fastlm.revert(fast)
    assert len(backbone._forward_pre_hooks) == 0


def test_albert_shared_layer_swaps_once():
    model = fastlm.optimize(_model("albert"))
    layers = [m for m in model.modules() if type(m).__name__ == "FastLMAlbertLayer"]
    assert len(layers) == 1  # one object, run num_hidden_layers times
    fastlm.revert(model)
    assert type(model.encoder.albert_layer_groups[0].albert_layers[0]).__name__ == "AlbertLayer"


@pytest.mark.parametrize("family", ["roberta", "distilbert", "albert", "electra"])
def test_trains_with_dropout(family):
    """Training mode with dropout: the optimized layers run their dropouts (a different
    draw than transformers', so only that it trains, and that eval matches again)."""
    model = _model(family, "ForSequenceClassification")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    ref, fast = _twins(model)
    fast.train()
    inputs, _ = _inputs(family, "ForSequenceClassification")
    torch.manual_seed(1)
    first = fast(**inputs).logits
    second = fast(**inputs).logits
    assert not torch.equal(first, second)  # dropout is live
    fast(**inputs).loss.backward()
    assert all(p.grad is not None for n, p in fast.named_parameters() if "pooler" not in n)
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fast(**inputs).logits, ref(**inputs).logits, atol=ATOL, rtol=RTOL
        )


# --- GPT-BigCode: multi-query attention, generate ----------------------------------------------


def _generate(model, ids, mask, **kw):
    torch.manual_seed(7)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw)
    return out.sequences if hasattr(out, "sequences") else out


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
@pytest.mark.parametrize(
    "kw", [{}, {"num_beams": 3}, {"do_sample": True, "top_k": 5}], ids=["greedy", "beam", "sample"]
)
def test_gpt_bigcode_generate_matches(multi_query, kw):
    ref, fast = _twins(_model("gpt-bigcode", "ForCausalLM", multi_query=multi_query))
    ids, mask = padded_batch(VOCAB, [7, 4], 7, left=True, low=3)
    with torch.no_grad():
        assert torch.equal(_generate(fast, ids, mask, **kw), _generate(ref, ids, mask, **kw))


@pytest.mark.parametrize("family", ["roberta", "distilbert", "gpt-bigcode"])
def test_autocast_bf16_matches_stock_autocast(family):
    """Under torch.autocast("cpu", bfloat16), the optimized model trains as stock autocast
    does: the same output dtype and loss within bf16 rounding."""
    head = "ForCausalLM" if family == "gpt-bigcode" else "ForSequenceClassification"
    ref, fast = _twins(_model(family, head))
    inputs, _ = _inputs(family, head)
    results = []
    for model in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        results.append(out)
    assert results[1].logits.dtype == results[0].logits.dtype
    torch.testing.assert_close(results[1].loss, results[0].loss, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_linears_called_plainly_take_the_hosts_faster_form(family, monkeypatch):
    """Every nn.Linear of the optimized model (heads, poolers, MPNet's and GPT-BigCode's
    attention projections) is fastlm.nn.Linear: a bf16 model computes each product in the
    form fastlm.ops.linear picks (here pinned to the widened one) and matches stock bf16."""
    monkeypatch.setattr(linear_module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(linear_module, "HALF_FORM", "widened")
    head = "ForCausalLM" if family == "gpt-bigcode" else "ForMaskedLM"
    ref, fast = _twins(_model(family, head).to(torch.bfloat16))
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is fastlm.nn.Linear for m in linears)
    called, widened = set(), set()
    for m in linears:
        m.register_forward_hook(lambda m, *_: called.add(id(m.weight)))
    real = linear_module._widened
    monkeypatch.setattr(
        linear_module, "_widened", lambda x, w, b: widened.add(id(w)) or real(x, w, b)
    )
    # Inside a layer computed in fp32 (MPNet's: transformers' attention over these linears)
    # the product widens the half weight for its fp32 input instead.
    real_operands = linear_module.widened_operands

    def operands(x, *params):
        widened.update(id(p) for p in params if p is not None and p.dtype == torch.bfloat16)
        return real_operands(x, *params)

    monkeypatch.setattr(linear_module, "widened_operands", operands)
    ids, mask = _batch(family)
    with torch.no_grad():
        got = fast(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert called and called <= widened
    valid = mask.bool()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got[valid].float(), want[valid].float(), atol=0.1, rtol=0.05)


def _parity_error(got, want, ref) -> tuple[float, float]:
    """(ours, stock's) largest error against the fp32 reference ``ref``."""
    return (got.float() - ref).abs().max().item(), (want.float() - ref).abs().max().item()


# The native form does not read the layout: packed only there.
HALF_LAYER_CASES = [("widened", (9, 5, 2)), ("widened", (9, 9, 9)), ("native", (9, 5, 2))]


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize(
    "form, lengths", HALF_LAYER_CASES, ids=["widened-packed", "widened-padded", "native-packed"]
)
def test_half_layers_run_in_fp32_where_their_products_do(family, form, lengths, monkeypatch):
    """A bf16 model whose products take the widened form runs each fused layer wholly in
    fp32 (attention and both LayerNorms see fp32, the layer hands on bf16 as stock's does;
    MPNet's attention is transformers' own, over fastlm.nn.Linear projections); with the
    native form pinned the layer stays in bf16. Either way outputs and gradients keep the
    parity rule against the fp32 model: at most 2x stock bf16's error, plus one bf16
    rounding step."""
    monkeypatch.setattr(linear_module, "MEASURED_WEIGHT", 1)
    monkeypatch.setattr(linear_module, "HALF_FORM", form)
    fp32 = _model(family, "Model")
    ref, fast = _twins(copy.deepcopy(fp32).to(torch.bfloat16))
    seen = {"attention": set(), "norm": set(), "layer": set()}
    for layer in fast.modules():
        parts = layer.__dict__.get("_fastlm_parts")
        if parts is None:
            continue
        attention = layer.attention if parts.attention is None else parts.attention
        attention.register_forward_pre_hook(lambda m, a: seen["attention"].add(a[0].dtype))
        for norm in (parts.attention_norm, parts.ffn_norm):
            norm.register_forward_pre_hook(lambda m, a: seen["norm"].add(a[0].dtype))
        layer.register_forward_hook(lambda m, a, out: seen["layer"].add(_first_tensor(out).dtype))
    ids, mask = _batch(family, lengths)
    valid = mask.bool()
    results = []
    for model in (fp32, ref, fast):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
        out.float().square().sum().backward()
        results.append((out.detach(), param_grads(model)))
    inner = torch.float32 if form == "widened" else torch.bfloat16
    assert seen == {"attention": {inner}, "norm": {inner}, "layer": {torch.bfloat16}}
    (want32, grads32), (want, want_grads), (got, got_grads) = results
    assert got.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps
    ours, stock = _parity_error(got, want, want32)
    assert ours <= 2 * stock + step * want32.abs().max().item()
    for name, exact in grads32.items():
        ours, stock = _parity_error(got_grads[name], want_grads[name], exact)
        assert ours <= 2 * stock + step * exact.abs().max().item(), name


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def test_linears_outside_the_transformers_model_are_left():
    model = _model("roberta", "Model")
    outer = nn.Linear(4, 4)
    wrapped = nn.ModuleDict(dict(model=model, head=outer))
    fastlm.optimize(wrapped)
    assert type(outer) is nn.Linear
    assert type(model.pooler.dense) is fastlm.nn.Linear
    fastlm.revert(wrapped)
    assert type(model.pooler.dense) is nn.Linear
