"""fastlm.optimize on sentence-transformers models of every encoder family it serves (BERT,
RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, ALBERT, MPNet): a SentenceTransformer
(Transformer + mean Pooling) and a CrossEncoder (the family's ...ForSequenceClassification)
optimized in place, against the same object before optimize and after revert.

No network: each family is a tiny random model (fixed seed) saved with save_pretrained next to
a word-level tokenizer built with the ``tokenizers`` library, whose special tokens sit at the
ids the config expects (BERT-like [PAD]=0 ..., RoBERTa-like <s>=0 <pad>=1 ...), so the padded
batches encode and predict build are really masked (checked: each sentence embeds the same
alone as in its padded batch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastlm
from fastlm import backends
from fastlm.integrations.hf import fused_layers
from fastlm.models.bert import PACK_MIN_PADDING
from tests.models.util import transformers

st = pytest.importorskip("sentence_transformers")
tokenizers = pytest.importorskip("tokenizers")

# fp32 on CPU: the fused layers compute the same sums as transformers up to rounding.
ATOL, RTOL = 2e-6, 1e-5
# Weights 10x transformers' default initializer_range (0.02), so that attention moves the
# outputs: here, attending to the padding changes embeddings by 0.05 to 0.3 (measured), far
# outside the tolerance.
INIT_RANGE = 0.2
MAX_LENGTH = 48  # tokenizer model_max_length: below every config's usable positions

# From 1 to 16 tokens (3 to 18 with the specials): padded to the longest, 43% of the batch
# is padding, so the optimized layers run on the valid tokens only (varlen).
SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "fastlm fuses attention, layer norm and the feed forward block.",
    "Embeddings",
]
# Under 20% padding (1 of 28 positions): the layers attend over the padded batch with the
# key padding mask instead (as they do over PAIRS, 15% padding).
NEARLY_FULL = [
    "a cat sat on the mat near the dog this morning.",
    "the lazy dog sat on the mat near the cat.",
]
PAIRS = [
    ("Hi.", "a cat sat on the mat."),
    ("The quick brown fox jumps over the lazy dog.", "the dog is lazy."),
    ("fastlm fuses attention", "layer norm and the feed forward block are fused."),
]
TEXTS = SENTENCES + NEARLY_FULL + [text for pair in PAIRS for text in pair]
WORDS = sorted(
    {
        w
        for text in TEXTS
        for w, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())
    }
)

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # pad_token_id 0
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # pad_token_id 1
VOCAB = len(BERT_SPECIALS) + len(WORDS)

# Shared by every family's config (their own names for them where they differ).
DIMS = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# RoBERTa-likes and MPNet number positions from pad_token_id + 1: 64 leaves 62 positions.
ROBERTA_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)


@dataclass(frozen=True)
class Case:
    """One family: its config, its tokenizer's style and where its layers sit."""

    name: str
    config: Callable[[], transformers.PretrainedConfig]
    layers: Callable[[torch.nn.Module], list]  # the backbone's encoder layers
    layer_class: str  # transformers' class of those layers
    roberta_style: bool = False  # <s> <pad> </s> specials, pad_token_id 1, no token types
    token_types: bool = True  # the model takes token_type_ids
    # fastlm runs its self-attention and attn_implementation becomes "fastlm" (MPNet: no)
    fused_attention: bool = True


def _encoder_layers(backbone):
    return list(backbone.encoder.layer)


def _bert_like(cls, **kw):
    return lambda: cls(
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=INIT_RANGE,
        **DIMS, **NO_DROPOUT, **kw,
    )  # fmt: skip


def _roberta_like(name: str, cls) -> Case:
    return Case(
        name, _bert_like(cls, type_vocab_size=1, **ROBERTA_IDS), _encoder_layers,
        cls.__name__.replace("Config", "Layer"), roberta_style=True, token_types=False,
    )  # fmt: skip


CASES = [
    Case("BERT", _bert_like(transformers.BertConfig), _encoder_layers, "BertLayer"),
    _roberta_like("RoBERTa", transformers.RobertaConfig),
    _roberta_like("XLM-RoBERTa", transformers.XLMRobertaConfig),
    _roberta_like("CamemBERT", transformers.CamembertConfig),
    Case(
        "ELECTRA",
        _bert_like(transformers.ElectraConfig, embedding_size=16),
        _encoder_layers,
        "ElectraLayer",
    ),
    Case(
        "DistilBERT",
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_heads=4,
            n_layers=2,
            hidden_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            initializer_range=INIT_RANGE,
        ),
        lambda backbone: list(backbone.transformer.layer),
        "TransformerBlock",
        token_types=False,
    ),
    Case(
        "ALBERT",  # one layer object shared by both layers; hidden_act gelu_new (tanh GELU)
        _bert_like(transformers.AlbertConfig, embedding_size=16, classifier_dropout_prob=0.0),
        lambda backbone: list(backbone.encoder.albert_layer_groups[0].albert_layers),
        "AlbertLayer",
    ),
    Case(
        "MPNet",  # transformers' MPNetAttention keeps the attention (relative position bias)
        lambda: transformers.MPNetConfig(
            vocab_size=VOCAB,
            max_position_embeddings=64,
            initializer_range=INIT_RANGE,
            **DIMS,
            **NO_DROPOUT,
            **ROBERTA_IDS,
        ),
        _encoder_layers,
        "MPNetLayer",
        roberta_style=True,
        token_types=False,
        fused_attention=False,
    ),
]
BY_NAME = {case.name: case for case in CASES}


def _cases(*names: str):
    return [pytest.param(BY_NAME[n], id=n) for n in names]


ALL = _cases(*BY_NAME)


def _tokenizer(case: Case) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (lower-cased, split on whitespace and punctuation)
    that adds the family's special tokens around one text or a pair."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    if case.roberta_style:
        specials = ROBERTA_SPECIALS
        cls, pad, sep, unk, mask = specials
        post = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, 0), (sep, 2)],
        )  # fmt: skip
    else:
        specials = BERT_SPECIALS
        pad, unk, cls, sep, mask = specials
        post = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, 2), (sep, 3)],
        )  # fmt: skip
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = post
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if case.token_types else [])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep,
        mask_token=mask, bos_token=cls, eos_token=sep, model_max_length=MAX_LENGTH,
        model_input_names=names,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``case -> folder`` holding the family's tiny base model and tokenizer (built once)."""
    built: dict[str, str] = {}

    def get(case: Case) -> str:
        if case.name not in built:
            folder = tmp_path_factory.mktemp(case.name.replace("-", "").lower())
            config = case.config()
            tokenizer = _tokenizer(case)
            assert tokenizer.pad_token_id == config.pad_token_id
            assert len(tokenizer) == config.vocab_size
            torch.manual_seed(1234)
            transformers.AutoModel.from_config(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[case.name] = str(folder)
        return built[case.name]

    return get


def _load_st(case: Case, model_dir) -> st.SentenceTransformer:
    return st.SentenceTransformer(model_dir(case), device="cpu").eval()


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return model.base_model  # the family's *Model (itself for a SentenceTransformer's)


def _layer_classes(case: Case, model) -> set[str]:
    layers = case.layers(_backbone(model))
    assert len(layers) == (1 if case.name == "ALBERT" else 2)
    return {type(layer).__name__ for layer in layers}


def _ops_run() -> set[str]:
    """The fastlm ops that chose a backend since the last forget_decisions."""
    return {key[0] for key in backends._DECISIONS}


def _assert_fastlm_ran(case: Case, packed: bool) -> None:
    """fastlm's ops served the forwards since the last forget_decisions, not transformers':
    the attention over the valid tokens only (``packed``) or over the padded batch."""
    ops = _ops_run()
    assert ops >= {"layer_norm", "gelu_ffn"}, ops
    attention = {"attention_varlen"} if packed else {"attention"}
    assert ops & {"attention", "attention_varlen"} == (attention if case.fused_attention else set())


def _padding(features) -> float:
    return (features["attention_mask"] == 0).float().mean().item()


def _encode(model, sentences, normalize=False) -> torch.Tensor:
    return model.encode(sentences, convert_to_tensor=True, normalize_embeddings=normalize)


def _close(got, want, what: str = ""):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# --- SentenceTransformer ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_optimize_sentence_transformer_encodes_the_same(case, model_dir):
    model = _load_st(case, model_dir)
    hf = model[0].auto_model
    features = model.preprocess(SENTENCES)
    assert _padding(features) >= PACK_MIN_PADDING  # the optimized layers pack the batch
    assert 0 < _padding(model.preprocess(NEARLY_FULL)) < PACK_MIN_PADDING  # they do not
    assert ("token_type_ids" in features) == case.token_types
    assert (features["input_ids"][features["attention_mask"] == 0] == hf.config.pad_token_id).all()
    assert features["input_ids"].max() < hf.config.vocab_size
    batches = {"padded": SENTENCES, "nearly_full": NEARLY_FULL}
    want = {(b, n): _encode(model, s, n) for b, s in batches.items() for n in (False, True)}
    # The set-up masks its padding: each sentence embeds (nearly) the same alone.
    alone = torch.cat([_encode(model, [s]) for s in SENTENCES])
    _close(alone, want["padded", False], "un-optimized: batch vs alone")
    implementation = hf.config._attn_implementation

    assert fastlm.optimize(model) is model
    assert _layer_classes(case, hf) == {f"FastLM{case.layer_class}"}
    assert hf.config._attn_implementation == ("fastlm" if case.fused_attention else implementation)
    backends.forget_decisions()
    for normalize in (False, True):
        _close(_encode(model, SENTENCES, normalize), want["padded", normalize])
    _assert_fastlm_ran(case, packed=True)
    backends.forget_decisions()
    for normalize in (False, True):
        _close(_encode(model, NEARLY_FULL, normalize), want["nearly_full", normalize])
    _assert_fastlm_ran(case, packed=False)
    _close(torch.cat([_encode(model, [s]) for s in SENTENCES]), alone, "optimized: alone")

    assert fastlm.revert(model) is model
    assert _layer_classes(case, hf) == {case.layer_class}
    assert hf.config._attn_implementation == implementation
    for (batch, normalize), embeddings in want.items():
        assert torch.equal(_encode(model, batches[batch], normalize), embeddings)


@pytest.mark.parametrize("case", _cases("RoBERTa", "DistilBERT", "ALBERT", "MPNet"))
def test_optimized_sentence_transformer_gradients(case, model_dir):
    """Gradients of a sentence-embedding loss through SentenceTransformer.forward (training
    mode, a padded batch) match the un-optimized model's, parameter by parameter."""
    ref_model, model = _load_st(case, model_dir).train(), _load_st(case, model_dir).train()
    fastlm.optimize(model)
    assert _layer_classes(case, model[0].auto_model) == {f"FastLM{case.layer_class}"}
    features = model.preprocess(SENTENCES)
    assert _padding(features) >= PACK_MIN_PADDING

    def grads(m):
        m.zero_grad()
        emb = m(dict(features))["sentence_embedding"]
        # squared cosine similarities (a contrastive loss's shape): gradients of order 1
        unit = torch.nn.functional.normalize(emb, dim=-1)
        (unit @ unit.T).square().sum().backward()
        return emb, {n: p.grad for n, p in m.named_parameters()}

    want_emb, want = grads(ref_model)
    backends.forget_decisions()
    got_emb, got = grads(model)
    _assert_fastlm_ran(case, packed=True)
    _close(got_emb, want_emb)
    assert got.keys() == want.keys()
    compared = 0
    for name, g in got.items():
        if want[name] is None:  # a pooler: unused by mean pooling
            assert g is None, name
            continue
        # sums over the tokens, the batch and the similarity matrix: more rounding steps
        torch.testing.assert_close(
            g, want[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
        compared += 1
    assert compared > 10


def test_optimized_roberta_sentence_transformer_pickles(model_dir, tmp_path, monkeypatch):
    """torch.save / torch.load of an optimized RoBERTa SentenceTransformer; its fused layer
    class is rebuilt on unpickling (as in a fresh process) and the copy encodes the same."""
    case = BY_NAME["RoBERTa"]
    model = _load_st(case, model_dir)
    want = _encode(model, SENTENCES)
    fastlm.optimize(model)
    torch.save(model, tmp_path / "st.pt")
    # A fresh process has not built FastLMRobertaLayer yet: unpickling must build it.
    monkeypatch.delitem(vars(fused_layers), f"FastLM{case.layer_class}")
    loaded = torch.load(tmp_path / "st.pt", weights_only=False)
    hf = loaded[0].auto_model
    assert _layer_classes(case, hf) == {f"FastLM{case.layer_class}"}
    assert hf.config._attn_implementation == "fastlm"
    backends.forget_decisions()
    _close(_encode(loaded, SENTENCES), want)
    _assert_fastlm_ran(case, packed=True)
    fastlm.revert(loaded)
    assert _layer_classes(case, hf) == {case.layer_class}
    assert torch.equal(_encode(loaded, SENTENCES), want)


# --- CrossEncoder ----------------------------------------------------------------------------


def _predict(model, activation=None) -> torch.Tensor:
    return model.predict(PAIRS, convert_to_tensor=True, activation_fn=activation)


@pytest.mark.parametrize(
    "case, num_labels",
    [pytest.param(BY_NAME[n], 1, id=n) for n in BY_NAME]
    + [pytest.param(BY_NAME["DistilBERT"], 3, id="DistilBERT-3-labels")],
)
def test_optimize_cross_encoder_predicts_the_same(case, num_labels, model_dir):
    model = st.CrossEncoder(model_dir(case), num_labels=num_labels, device="cpu")
    classifier = model.model
    assert type(classifier).__name__.endswith("ForSequenceClassification")
    assert classifier.config.num_labels == num_labels
    features = model.preprocess(PAIRS)
    assert 0 < _padding(features) < PACK_MIN_PADDING  # attended over the padded batch
    if case.token_types:
        assert features["token_type_ids"].max() == 1  # the second text of each pair
    # raw logits, and predict's default scores (sigmoid for one label)
    want = {act: _predict(model, act) for act in (torch.nn.Identity(), None)}
    assert want[None].shape == ((len(PAIRS),) if num_labels == 1 else (len(PAIRS), num_labels))

    assert fastlm.optimize(model) is model
    assert _layer_classes(case, classifier) == {f"FastLM{case.layer_class}"}
    backends.forget_decisions()
    for act, scores in want.items():
        _close(_predict(model, act), scores)
    _assert_fastlm_ran(case, packed=False)

    fastlm.revert(model)
    assert _layer_classes(case, classifier) == {case.layer_class}
    for act, scores in want.items():
        assert torch.equal(_predict(model, act), scores)
