"""Models: fastlm BERT / GPT-2 vs transformers eager, sdpa and torch.compile(sdpa).

Random weights from configs (no network): BERT-base (batch 1/8/32 x seq 128/256/512, no
padding and padding with mean valid length 0.6 x seq), GPT-2 124M and 355M (prefill
512/1024; decode tokens/s at batch 1/8/32 with a 128-token prompt; training step
fwd+bwd+AdamW at seq 1024). fp16 and bf16. Times are do_bench medians; every ratio is
against transformers in the same process.

``headline(res, device, timer, dry)``: the GPU check's rows (BERT-base B32 S512 40% padding,
GPT-2 124M decode at batch 1), tiny through the interpreter for its dry run.
"""

from __future__ import annotations

import functools
import sys

import torch

from benchmarks.harness import Results, bench, bench_or_none, line_plot, parse_args, require_gpu


def _hf_variants(make, with_compile=True):
    """transformers models: eager, sdpa, torch.compile(sdpa) — sharing one set of weights."""
    eager = make("eager")
    sdpa = make("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    variants = {"hf-eager": eager, "hf-sdpa": sdpa}
    if with_compile:
        variants["hf-sdpa-compile"] = torch.compile(sdpa, dynamic=False)
    return variants, eager


def _hf_model(auto: str, cfg, impl: str, device, dtype):
    """A random-weight transformers model (``auto``: an Auto class name) with that attention."""
    import transformers

    model = getattr(transformers, auto).from_config(cfg, attn_implementation=impl)
    return model.to(device, dtype).eval()


def _mask(batch, seq, padded, device):
    if not padded:
        return torch.ones(batch, seq, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    lengths = (
        (torch.rand(batch, generator=g) * 0.8 * seq + 0.2 * seq).long().clamp(1, seq)
    )  # mean ~0.6 seq
    return (torch.arange(seq)[None] < lengths[:, None]).long().to(device)


def bert_shape(res, hf, ours, cfg, batch, seq, padded, dtype, device="cuda", timer=None):
    """BERT forward at one (batch, seq, padding): every transformers variant and fastlm."""
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    mask = _mask(batch, seq, padded, device)
    shape = dict(batch=batch, seq=seq, padded=padded)
    times = {}
    with torch.no_grad():
        for name, m in hf.items():
            times[name] = bench_or_none(lambda m=m: m(ids, attention_mask=mask), timer=timer)
        times["fastlm"] = bench_or_none(lambda: ours(ids, attention_mask=mask), timer=timer)
    for name, ms in times.items():
        base_ms = times.get("hf-sdpa")
        res.add(model="bert-base", pass_="fwd", impl=name, dtype=dtype, shape=shape, ms=ms,
                speedup_vs_sdpa=base_ms / ms if ms and base_ms else None)  # fmt: skip


def bert_models(cfg, dtype, device="cuda", with_compile=True, backend=None):
    """(transformers variants, the fastlm copy of their weights) for a BERT config."""
    import fastlm.models as fm

    hf, base = _hf_variants(
        lambda impl: _hf_model("AutoModel", cfg, impl, device, dtype), with_compile
    )
    return hf, fm.BertModel.from_hf(base, backend=backend).eval()


def bench_bert(res, dtypes, quick):
    import transformers

    cfg = transformers.BertConfig()  # bert-base
    for dtype in dtypes:
        hf, ours = bert_models(cfg, dtype, backend="triton")
        for batch in [1, 8] if quick else [1, 8, 32]:
            for seq in [128] if quick else [128, 256, 512]:
                for padded in (False, True):
                    bert_shape(res, hf, ours, cfg, batch, seq, padded, dtype)


def gpt2_decode(res, label, impls, cfg, batch, dtype, device="cuda", timer=None, new=64):
    """Greedy decode tokens/s: ``new`` tokens after a 128-token prompt, for each model in
    ``impls`` (fastlm's own generate, transformers' with its cache)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, 128), device=device)
    timer = timer or functools.partial(bench, warmup_ms=1, rep_ms=1)
    for n, m in impls.items():
        # The same arguments for both: exactly ``new`` tokens (random weights may emit eos).
        run = lambda m=m: m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     pad_token_id=0)  # fmt: skip
        ms = bench_or_none(run, timer=timer)
        res.add(model=label, pass_="decode", impl=n, dtype=dtype, shape=dict(batch=batch, seq=128 + new),
                ms=ms, tokens_per_s=batch * new / ms * 1e3 if ms else None)  # fmt: skip


def headline(res, device, timer=None, dry=False, budget=None) -> None:
    """The GPU check's rows: BERT-base forward at batch 32, seq 512, 40% padding, and GPT-2
    124M greedy decode tokens/s at batch 1, fp16, against transformers sdpa (and eager) in
    this process, no torch.compile. The dry run: tiny configs in fp32 on the interpreter."""
    import transformers

    import fastlm.models as fm

    more = budget or (lambda: True)
    dtype = torch.float32 if dry else torch.float16
    if dry:
        bert_cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                           intermediate_size=48, vocab_size=61)  # fmt: skip
        gpt2_cfg = transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=160
        )
    else:
        bert_cfg, gpt2_cfg = transformers.BertConfig(), transformers.GPT2Config()
    if more():
        hf, ours = bert_models(bert_cfg, dtype, device, with_compile=False)
        bert_shape(res, hf, ours, bert_cfg, 2 if dry else 32, 16 if dry else 512, True, dtype,
                   device, timer)  # fmt: skip
        del hf, ours
    if more():
        hf, base = _hf_variants(
            lambda impl: _hf_model("AutoModelForCausalLM", gpt2_cfg, impl, device, dtype), False
        )
        impls = {"hf-sdpa": hf["hf-sdpa"], "fastlm": fm.GPT2LMHeadModel.from_hf(base).eval()}
        gpt2_decode(
            res, "gpt2-124M", impls, gpt2_cfg, 1, dtype, device, timer, new=4 if dry else 64
        )


def bench_gpt2(res, dtypes, quick):
    import transformers

    import fastlm.models as fm

    sizes = {"gpt2-124M": dict(), "gpt2-355M": dict(n_layer=24, n_embd=1024, n_head=16)}
    for label, kw in list(sizes.items())[:1] if quick else sizes.items():
        cfg = transformers.GPT2Config(**kw, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
        for dtype in dtypes:
            hf, base = _hf_variants(
                lambda impl: _hf_model("AutoModelForCausalLM", cfg, impl, "cuda", dtype)
            )
            ours = fm.GPT2LMHeadModel.from_hf(base, backend="triton").eval()
            impls = {**hf, "fastlm": ours}
            for seq in [512] if quick else [512, 1024]:  # prefill
                ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
                with torch.no_grad():
                    times = {n: bench_or_none(lambda m=m: m(ids).logits) for n, m in impls.items()}
                for n, ms in times.items():
                    res.add(
                        model=label,
                        pass_="prefill",
                        impl=n,
                        dtype=dtype,
                        shape=dict(batch=1, seq=seq),
                        ms=ms,
                    )
            for batch in [1, 8] if quick else [1, 8, 32]:  # decode tokens/s
                impls = {"hf-sdpa": hf["hf-sdpa"], "hf-eager": hf["hf-eager"], "fastlm": ours}
                gpt2_decode(res, label, impls, cfg, batch, dtype)
            # training step at seq 1024 (batch 4), fwd + bwd + AdamW
            ids = torch.randint(0, cfg.vocab_size, (4, 1024 if not quick else 512), device="cuda")
            for n, m in (
                ("hf-sdpa", base.__class__(cfg, attn_implementation="sdpa")),
                ("fastlm", None),
            ):
                model = (
                    (fm.GPT2LMHeadModel.from_hf(base, backend="triton") if m is None else m)
                    .cuda()
                    .to(dtype)
                    .train()
                )
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

                def step(model=model, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    model(ids, labels=ids).loss.backward()
                    opt.step()

                ms = bench_or_none(step)
                res.add(
                    model=label,
                    pass_="train",
                    impl=n,
                    dtype=dtype,
                    shape=dict(batch=4, seq=ids.shape[1]),
                    ms=ms,
                )
                del model, opt
            del hf, base, ours, impls
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    require_gpu("bench_models")
    args = parse_args(__doc__, argv)
    res = Results("models", args.out)
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    bench_bert(res, dtypes, args.quick)
    bench_gpt2(res, dtypes, args.quick)
    bert_rows = [r for r in res.rows if r["model"] == "bert-base" and r.get("ms")]
    res.save(
        plot=line_plot(bert_rows, x="seq", y="ms", series="impl", title="BERT-base forward (ms)")
    )


if __name__ == "__main__":
    main(sys.argv[1:])
