"""GPT-2 on fastlm ops, with Hugging Face's module names and state_dict keys.

Pre-LN blocks with both residual adds fused into the next LayerNorm, embed size E, n heads:

    r  = wte[ids] + wpe[pos];  m = none                             residual stream r (B, S, E)
    per block i (GPT2Block.forward(r, m): its own parameters only):
        x, r  = LN1_i(m, residual=r)      (block 0: x = LN1_0(r))   r <- r + previous MLP output
        q|k|v = x @ Wc_attn + b           (Conv1D weight is (E, 3E)) one GEMM, strided views
        a     = attention(q, k, v, causal, key_padding_mask)        or attention_with_kvcache
        x, r  = LN2_i(a @ Wc_proj + b, residual=r)                  r <- r + attn; x = LN2(r)
        m     = W2 gelu_tanh(W1 x + b1) + b2                        gelu_ffn (gelu_new)
    x  = ln_f(m, residual=r)

Each block's parameters are used only inside that block's forward, so wrappers that act
per block (FSDP2's fully_shard gathers a block's parameters around its forward; activation
checkpointing; hooks) see every use.

The LM head is tied: ``lm_head.weight is transformer.wte.weight``.

Padding: ``attention_mask`` (B, S) becomes the attention's key_padding_mask. Outputs at
padded positions are not meaningful (a left-padding query has no key to attend to and the
attention returns zeros there; transformers returns other values); valid positions match.

KV cache: ``past_key_values`` is a :class:`StaticKVCache` (``use_cache=True`` allocates one
of n_positions rows). Prefill into an empty cache runs ``fastlm.attention`` and writes each
sequence's valid tokens compactly from row 0; later calls append through
``fastlm.attention_with_kvcache`` and must not contain padding. Default position ids are
``arange`` after the longest stored sequence on an empty cache, as in transformers'
forward, and ``seqlens[b] + arange`` on a non-empty one (positions of unpadded storage);
:meth:`GPT2LMHeadModel.generate` passes HF generate's cumsum positions explicitly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from fastlm.cpu_threads import governed
from fastlm.models._base import (
    FastLMPreTrained,
    check_attention_mask,
    check_input_ids,
    check_position_ids,
    check_values,
    drop_full_mask,
)
from fastlm.models._weights import DerivedWeight, writes_may_be_hidden
from fastlm.models.config import GPT2Config, gelu_approximate
from fastlm.models.heads import (
    TaskModel,
    causal_lm_loss,
    classifier_dropout,
    sequence_classification_loss,
    token_loss,
)
from fastlm.models.kv_cache import StaticKVCache
from fastlm.models.outputs import (
    BaseModelOutput,
    CausalLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from fastlm.nn import GeluFFN, LayerNorm, Linear, linear
from fastlm.nn.attention_layouts import Cached, Padded


class Conv1D(nn.Module):
    """transformers' Conv1D: y = x @ weight + bias with weight (in, out), stored as
    transformers stores it.

    While ``decoding`` (set by :func:`row_major_weights` for a CPU generate) the products
    read a row-major (out, in) copy of the weight instead, which the few-row GEMMs of a
    decode step stream about three times as fast (fastlm.ops.linear). The copy is a
    :class:`DerivedWeight`: made once, reused by later generate calls, remade after the
    weight changes; never in state_dict, never seen by optimizers or FSDP.
    """

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(0.0, 0.02))
        self.bias = nn.Parameter(torch.zeros(nf))
        self.decoding = False
        self.__dict__["row_major"] = DerivedWeight(_row_major)

    def linear_weight(self) -> torch.Tensor:
        """The weight in F.linear's (out, in) orientation: the row-major copy while
        decoding, else the transposed view of the parameter (no copy)."""
        return self.row_major(self.weight) if self.decoding else self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.linear_weight(), self.bias)


def _row_major(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()


@contextmanager
def row_major_weights(model: nn.Module, steps: int):
    """Decode ``steps`` steps with every Conv1D of ``model`` reading its row-major copy:
    what a CPU generate does. fastlm.ops.linear streams such a weight about three times as
    fast in the few-row GEMMs of a step (GPT-2 124M's blocks: 15 instead of 20 ms a step at
    batch 1, 18 instead of 44 at batch 4, on this project's 2-core CPU machine). The copies
    cost one more copy of the block weights in memory (340 MB for GPT-2 124M), made by the
    first such generate (about 0.1 s) and kept while the weights are unchanged. A no-op for
    weights off the CPU, fewer than :data:`ROW_MAJOR_MIN_STEPS` steps, and under a
    torch.distributed process group (where the copy could not tell that FSDP updated a
    weight, so it would be remade every step; see fastlm.models._weights).
    """
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    if (
        steps < ROW_MAJOR_MIN_STEPS or not convs or convs[0].weight.device.type != "cpu"
        or writes_may_be_hidden()
    ):  # fmt: skip
        yield
        return
    try:
        for m in convs:
            m.decoding = True
        yield
    finally:
        for m in convs:
            m.decoding = False


# Decode steps from which reading the row-major copies is worth making them.
ROW_MAJOR_MIN_STEPS = 4


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        e = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.scaling = config.layer_scale(layer_idx)
        self.c_attn = Conv1D(3 * e, e)
        self.c_proj = Conv1D(e, e)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask, cache: StaticKVCache | None, order, backend) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.c_attn(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        p = self.attn_dropout.p if self.training else 0.0
        if cache is None or cache.is_empty:
            out = Padded(b, s, mask).attend(
                q, k, v, causal=True, softmax_scale=self.scaling, dropout_p=p, backend=backend
            )
            if cache is not None:
                cache.write_compact(self.layer_idx, k, v, order)
        else:
            if p > 0:
                raise NotImplementedError(
                    "GPT2Model: attention dropout with a non-empty KV cache is not supported; use eval() to decode"
                )
            kc, vc = cache.layer(self.layer_idx)
            out = Cached(kc, vc, cache.seqlens).attend(
                q, k, v, causal=True, softmax_scale=self.scaling, backend=backend
            )
        return self.resid_dropout(self.c_proj(out.reshape(b, s, -1)))


class GPT2MLP(nn.Module):
    def __init__(self, inner: int, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.dropout = nn.Dropout(config.resid_pdrop)
        # The fused FFN over HF's two Conv1D layers (shared parameters; their transposed
        # weights are strided views). Kept out of the module tree: state_dict keeps HF's names.
        self.__dict__["ffn"] = GeluFFN.from_linears(
            self.c_fc, self.c_proj, gelu_approximate(config.activation_function, "GPT2Model")
        )

    def forward(self, x: torch.Tensor, backend) -> torch.Tensor:
        self.ffn.backend = backend
        return self.dropout(self.ffn(x))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config.inner_dim, config)

    @governed
    def forward(self, r, m, mask, cache, order, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """``r``: the residual stream before the previous block's MLP output ``m`` is added
        (``m`` None in the first block, where ``r`` is the embeddings). Returns this block's
        (r, m) alike: its MLP output is added in the next LayerNorm, fused."""
        x, r = (self.ln_1(r), r) if m is None else self.ln_1(m, residual=r)
        a = self.attn(x, mask, cache, order, backend)
        x, r = self.ln_2(a, residual=r)
        return r, self.mlp(x, backend)


class GPT2Model(FastLMPreTrained):
    """Drop-in for transformers' GPT2Model."""

    config_class = GPT2Config
    checkpoint_prefixes = ("transformer.",)

    def __init__(self, config: GPT2Config, *, backend: str | None = None):
        super().__init__(config, backend)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> StaticKVCache:
        """An empty StaticKVCache for this model (default capacity: n_positions)."""
        c = self.config
        w = self.wte.weight
        max_len = c.n_positions if max_len is None else max_len
        return StaticKVCache(
            c.n_layer, batch_size, max_len, c.n_head, c.head_dim, dtype=w.dtype, device=w.device
        )

    @staticmethod
    def next_positions(cache: StaticKVCache, seq: int) -> torch.Tensor:
        """(B, seq) positions of tokens appended to a non-empty cache: ``seqlens[b] + arange``
        (the cache stores each sequence unpadded, so its length is its next position)."""
        return cache.seqlens.long()[:, None] + torch.arange(seq, device=cache.seqlens.device)

    def stack(
        self,
        input_ids,
        position_ids,
        token_type_ids,
        mask,
        cache,
        order,
        backend,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Embeddings and blocks on checked inputs: (the final hidden states (B, S, E), the
        hidden states transformers returns or None). Writes the keys/values into ``cache``
        but leaves its lengths to the caller. No validation and no host read."""
        r = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            r = r + self.wte(token_type_ids)
        r = self.drop(r)
        # transformers' hidden_states: the embeddings, the residual stream after each block
        # but the last, and ln_f of the last (L + 1 tensors).
        states = [r] if output_hidden_states else None
        m = None
        for block in self.h:
            if output_hidden_states and m is not None:
                states.append(r + m)  # the sum the block's fused ln_1 forms again
            r, m = block(r, m, mask, cache, order, backend)
        x = self.ln_f(r) if m is None else self.ln_f(m, residual=r)[0]
        if output_hidden_states:
            states.append(x)
        return x, states

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: StaticKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        return self.backbone_forward(
            input_ids, kwargs, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
        )  # fmt: skip

    def _run(
        self,
        input_ids,
        *,
        attention_mask,
        token_type_ids,
        position_ids,
        backend,
        output_hidden_states: bool,
        where: str,
        past_key_values: StaticKVCache | None = None,
        use_cache: bool | None = None,
    ) -> BaseModelOutput:
        cfg = self.config
        cache = past_key_values
        if cache is not None and not isinstance(cache, StaticKVCache):
            raise TypeError(
                f"{where}: past_key_values must be a fastlm StaticKVCache (model.new_cache(...)), got {type(cache).__name__}"
            )
        past = cache.max_filled if cache is not None else 0
        check_input_ids(input_ids, cfg.vocab_size, cfg.n_positions, where, past=past)
        bsz, seq = input_ids.shape
        if cache is None and use_cache:
            cache = self.new_cache(bsz)
        if cache is not None:
            if cache.batch_size != bsz:
                raise ValueError(
                    f"{where}: the KV cache is for batch {cache.batch_size}, input_ids has batch {bsz}"
                )
            cache.check_room(seq, where)
        mask = None
        if attention_mask is not None and cache is not None and not cache.is_empty:
            # HF passes (B, past + S); only the new tokens' columns matter for compact storage.
            if (
                attention_mask.dim() == 2
                and attention_mask.shape[0] == bsz
                and attention_mask.shape[1] >= seq
            ):
                attention_mask = attention_mask[:, -seq:]
            appended = check_attention_mask(attention_mask, (bsz, seq), where)
            check_values(
                appended,
                lambda: appended,
                f"{where}: padding inside tokens appended to a non-empty KV cache is not supported",
                NotImplementedError,
            )
        else:
            mask = drop_full_mask(check_attention_mask(attention_mask, (bsz, seq), where))

        if position_ids is None:
            if cache is not None and not cache.is_empty:
                position_ids = self.next_positions(cache, seq)
            else:
                position_ids = torch.arange(seq, device=input_ids.device)[None]
        check_position_ids(position_ids, bsz, seq, cfg.n_positions, where)
        if token_type_ids is not None:
            check_input_ids(
                token_type_ids,
                cfg.vocab_size,
                cfg.n_positions,
                where + " (token_type_ids)",
                past=past,
            )

        order = None
        if cache is not None and cache.is_empty and mask is not None:
            # Valid tokens first, in order: the compact layout of the cache.
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        x, states = self.stack(
            input_ids, position_ids, token_type_ids, mask, cache, order, backend,
            output_hidden_states,
        )  # fmt: skip
        if cache is not None:
            cache.advance(seq if mask is None else mask.sum(1), seq)
        return BaseModelOutput(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class _GPT2Task(TaskModel):
    config_class = GPT2Config
    backbone_cls = GPT2Model
    base_model_prefix = "transformer"
    checkpoint_prefixes = ("transformer.",)
    backbone_keywords = ("past_key_values", "use_cache")

    def __init__(self, config: GPT2Config, *, backend: str | None = None):
        super().__init__(config, backend=backend)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> StaticKVCache:
        return self.transformer.new_cache(batch_size, max_len)


class GPT2LMHeadModel(_GPT2Task):
    """Drop-in for transformers' GPT2LMHeadModel, with a StaticKVCache-based generate().
    The LM head is the word embedding unless ``tie_word_embeddings=False``."""

    _tied_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "transformer.wte.weight"}
    head_keywords = ("labels", "logits_to_keep")

    def build_head(self, config):
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def head(self, out, input_ids, labels=None, logits_to_keep=0):
        h = out.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError(
                    "GPT2LMHeadModel.forward: labels need all logits; do not pass logits_to_keep"
                )
            h = h[:, -logits_to_keep:]
        logits = linear(h, self.lm_head.weight)
        loss = causal_lm_loss(logits, labels, "GPT2LMHeadModel.forward")
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def decode_step(self, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Append one token per sequence: ids (B, 1) -> next-token logits (B, V).

        The step :func:`fastlm.models.generation.generate` repeats (and captures in a CUDA
        graph on CUDA): positions ``cache.seqlens``, attention_with_kvcache on the static
        cache, the LM head, ``cache.advance``. It trusts its inputs (generate checked the
        prompt and draws every later id from the vocabulary) so it reads nothing on the
        host, and it allocates only activations.
        """
        t = self.transformer
        pos = t.next_positions(cache, 1)
        x, _ = t.stack(input_ids, pos, None, None, cache, None, self.backend, False)
        cache.advance(1, 1)
        return linear(x[:, -1], self.lm_head.weight)

    def decoding_weights(self, steps: int):
        """The context :func:`fastlm.models.generation.generate` decodes ``steps`` steps in:
        row-major copies of the block weights on CPU (:func:`row_major_weights`)."""
        return row_major_weights(self, steps)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """transformers-style generation; see :func:`fastlm.models.generation.generate`."""
        from fastlm.models.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)


class GPT2ForSequenceClassification(_GPT2Task):
    """Classifies from the last non-padding token (``config.pad_token_id`` marks padding;
    without one, only batches of one sequence), as transformers does."""

    def build_head(self, config):
        self.num_labels = config.num_labels
        self.score = Linear(config.n_embd, config.num_labels, bias=False)

    def head(self, out, input_ids, labels=None):
        where = "GPT2ForSequenceClassification.forward"
        h = out.last_hidden_state
        bsz, seq = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if bsz != 1:
                raise ValueError(
                    f"{where}: batches of more than one sequence need config.pad_token_id to find "
                    "each sequence's last token"
                )
            last = torch.full((1,), seq - 1, device=h.device)
        else:
            # The rightmost non-pad position (argmax of position * is-token).
            positions = torch.arange(seq, device=h.device)
            last = (positions * (input_ids != pad)).argmax(-1)
        logits = self.score(h[torch.arange(bsz, device=h.device), last])
        loss = sequence_classification_loss(logits, labels, self.config, where)
        return SequenceClassifierOutput(loss, logits)


class GPT2ForTokenClassification(_GPT2Task):
    """Per-token dropout -> classifier (B, S, num_labels)."""

    def build_head(self, config):
        self.num_labels = config.num_labels
        self.dropout = classifier_dropout(config, default=0.1)
        self.classifier = Linear(config.n_embd, config.num_labels)

    def head(self, out, input_ids, labels=None):
        logits = self.classifier(self.dropout(out.last_hidden_state))
        return TokenClassifierOutput(
            token_loss(logits, labels, "GPT2ForTokenClassification.forward"), logits
        )
