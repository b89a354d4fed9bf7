"""The transformers families under ``fastlm.optimize`` on a GPU, and packed against padded.

Rows (fp16, random weights, do_bench medians, every ratio against transformers sdpa in the
same process, no torch.compile):

* BERT-base forward, batch 32 x 128, padding 0 / 25 / 50%: transformers sdpa, the
  optimized model on the padded batch with a key mask (the CUDA default), and the same
  model packing the valid tokens (``fastlm.models.bert.PACK_ON_GPU``: one host read of the
  token count per forward, every padded row removed). This settles which one the CUDA
  default should be;
* RoBERTa-base forward, batch 32 x 128, padding 0 / 50%: sdpa vs ``optimize`` (default);
* GPT-BigCode (768 wide, 12 layers, multi-query) forward 8 x 512, and greedy decode of 32
  tokens after a 128-token prompt at batch 1: sdpa vs ``optimize``.

``headline(res, device, timer, dry, budget)`` is gpu_check.sh's "families" section; its dry
run builds tiny configs on the CPU and times each call once through the interpreter (it
proves the code runs, never a speed). Alone: ``python -m benchmarks.bench_families``.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch

from benchmarks.harness import Results, bench, bench_or_none, parse_args, require_gpu


def _mask(batch: int, seq: int, padding: float, device) -> torch.Tensor:
    """Right padding, lengths spread evenly around a mean of seq * (1 - padding)."""
    mean = seq * (1.0 - padding)
    hi = min(seq, 2 * mean - 1) if padding else seq
    lo = 2 * mean - hi
    lengths = torch.linspace(hi, lo, batch).round().clamp(1, seq)
    return (torch.arange(seq)[None, :] < lengths[:, None]).long().to(device)


def _ids(vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)  # no pad id (0/1)


def _stock(config, device, dtype, auto: str = "AutoModel"):
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(config, attn_implementation="sdpa")
    return model.to(device, dtype).eval()


def _forward_rows(res, label, stock, impls, ids, mask, padding, dtype, timer):
    times = {"hf-sdpa": None, **dict.fromkeys(impls)}
    with torch.no_grad():
        times["hf-sdpa"] = bench_or_none(
            lambda: stock(input_ids=ids, attention_mask=mask), timer=timer
        )
        for name, run in impls.items():
            times[name] = bench_or_none(lambda run=run: run(ids, mask), timer=timer)
    base = times["hf-sdpa"]
    for name, ms in times.items():
        res.add(model=label, pass_="fwd", impl=name, dtype=dtype,
                shape=dict(batch=ids.shape[0], seq=ids.shape[1], padding=padding), ms=ms,
                speedup_vs_sdpa=base / ms if ms and base else None)  # fmt: skip


def _packing(pack: bool):
    """Runs the optimized model with CUDA packing on or off (restored after the call)."""
    import fastlm.models.bert as bert

    def run(model, ids, mask):
        before, bert.PACK_ON_GPU = bert.PACK_ON_GPU, pack
        try:
            return model(input_ids=ids, attention_mask=mask)
        finally:
            bert.PACK_ON_GPU = before

    return run


def headline(res, device, timer=None, dry=False, budget=None) -> None:
    import transformers as T

    import fastlm

    more = budget or (lambda: True)
    dtype = torch.float32 if dry else torch.float16
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                vocab_size=61)  # fmt: skip
    batch, seq = (2, 16) if dry else (32, 128)

    if more():  # BERT-base: packed vs padded vs transformers
        stock = _stock(T.BertConfig(**tiny) if dry else T.BertConfig(), device, dtype)
        optimized = fastlm.optimize(copy.deepcopy(stock))
        impls = {"fastlm-padded": lambda i, m: _packing(False)(optimized, i, m),
                 "fastlm-packed": lambda i, m: _packing(True)(optimized, i, m)}  # fmt: skip
        for padding in (0.5,) if dry else (0.0, 0.25, 0.5):  # the dry run proves the code
            if more():
                ids, mask = (
                    _ids(stock.config.vocab_size, batch, seq, device),
                    _mask(batch, seq, padding, device),
                )
                _forward_rows(res, "bert-base", stock, impls, ids, mask, padding, dtype, timer)
        del stock, optimized

    if more():  # RoBERTa-base, the optimize() default
        cfg = T.RobertaConfig(**tiny, pad_token_id=1) if dry else T.RobertaConfig(vocab_size=50265, pad_token_id=1, max_position_embeddings=514)  # fmt: skip
        stock = _stock(cfg, device, dtype)
        optimized = fastlm.optimize(copy.deepcopy(stock))
        impls = {"fastlm": lambda i, m: optimized(input_ids=i, attention_mask=m)}
        for padding in (0.5,) if dry else (0.0, 0.5):
            if more():
                ids, mask = (
                    _ids(cfg.vocab_size, batch, seq, device),
                    _mask(batch, seq, padding, device),
                )
                _forward_rows(res, "roberta-base", stock, impls, ids, mask, padding, dtype, timer)
        del stock, optimized

    if more():  # GPT-BigCode, multi-query
        cfg = T.GPTBigCodeConfig(
            n_embd=32 if dry else 768, n_layer=1 if dry else 12, n_head=2 if dry else 12,
            vocab_size=61 if dry else 49152, n_positions=1024, multi_query=True,
        )  # fmt: skip
        stock = _stock(cfg, device, dtype, "AutoModelForCausalLM")
        optimized = fastlm.optimize(copy.deepcopy(stock))
        fb, fs = (2, 16) if dry else (8, 512)
        ids, mask = _ids(cfg.vocab_size, fb, fs, device), _mask(fb, fs, 0.0, device)
        impls = {"fastlm": lambda i, m: optimized(input_ids=i, attention_mask=m)}
        _forward_rows(res, "gpt-bigcode", stock, impls, ids, mask, 0.0, dtype, timer)
        if more():
            new = 4 if dry else 32
            prompt = _ids(cfg.vocab_size, 1, 16 if dry else 128, device)
            decode_timer = timer or functools.partial(bench, warmup_ms=1, rep_ms=1)  # few calls
            times = {}
            for name, model in (("hf-sdpa", stock), ("fastlm", optimized)):
                run = lambda model=model: model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                                         do_sample=False, pad_token_id=0)  # fmt: skip
                with torch.no_grad():
                    times[name] = bench_or_none(run, timer=decode_timer)
            for name, ms in times.items():
                res.add(model="gpt-bigcode", pass_="decode", impl=name, dtype=dtype,
                        shape=dict(batch=1, seq=prompt.shape[1] + new), ms=ms,
                        tokens_per_s=new / ms * 1e3 if ms else None,
                        speedup_vs_sdpa=times["hf-sdpa"] / ms if ms and times["hf-sdpa"] else None)  # fmt: skip


def main() -> None:
    args = parse_args("families under fastlm.optimize, packed vs padded")
    require_gpu("bench_families")
    res = Results("families", args.out)
    headline(res, torch.device("cuda"))
    res.save()


if __name__ == "__main__":
    main()
    sys.exit(0)
