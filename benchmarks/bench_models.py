"""Models: fastlm BERT / GPT-2 vs transformers eager, sdpa and torch.compile(sdpa).

Random weights from configs (no network): BERT-base (batch 1/8/32 x seq 128/256/512, no
padding and padding with mean valid length 0.6 x seq), GPT-2 124M and 355M (prefill
512/1024; decode tokens/s at batch 1/8/32 with a 128-token prompt; training step
fwd+bwd+AdamW at seq 1024). fp16 and bf16. Times are do_bench medians; every ratio is
against transformers in the same process.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.harness import Results, bench_or_none, line_plot, parse_args, require_gpu


def _hf_variants(make):
    """transformers models: eager, sdpa, torch.compile(sdpa) — sharing one set of weights."""
    eager = make("eager")
    sdpa = make("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    return {
        "hf-eager": eager,
        "hf-sdpa": sdpa,
        "hf-sdpa-compile": torch.compile(sdpa, dynamic=False),
    }, eager


def _mask(batch, seq, padded, device):
    if not padded:
        return torch.ones(batch, seq, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    lengths = (
        (torch.rand(batch, generator=g) * 0.8 * seq + 0.2 * seq).long().clamp(1, seq)
    )  # mean ~0.6 seq
    return (torch.arange(seq)[None] < lengths[:, None]).long().to(device)


def bench_bert(res, dtypes, quick):
    import transformers

    import fastlm.models as fm

    cfg = transformers.BertConfig()  # bert-base
    for dtype in dtypes:
        hf, base = _hf_variants(
            lambda impl: (
                transformers.BertModel(cfg, attn_implementation=impl).cuda().to(dtype).eval()
            )
        )
        ours = fm.BertModel.from_hf(base, backend="triton").eval()
        for batch in [1, 8] if quick else [1, 8, 32]:
            for seq in [128] if quick else [128, 256, 512]:
                for padded in (False, True):
                    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
                    mask = _mask(batch, seq, padded, "cuda")
                    shape = dict(batch=batch, seq=seq, padded=padded)
                    times = {}
                    with torch.no_grad():
                        for name, m in hf.items():
                            times[name] = bench_or_none(lambda m=m: m(ids, attention_mask=mask))
                        times["fastlm"] = bench_or_none(lambda: ours(ids, attention_mask=mask))
                    for name, ms in times.items():
                        base_ms = times.get("hf-sdpa")
                        res.add(model="bert-base", pass_="fwd", impl=name, dtype=dtype, shape=shape, ms=ms,
                                speedup_vs_sdpa=base_ms / ms if ms and base_ms else None)  # fmt: skip


def bench_gpt2(res, dtypes, quick):
    import transformers

    import fastlm.models as fm

    sizes = {"gpt2-124M": dict(), "gpt2-355M": dict(n_layer=24, n_embd=1024, n_head=16)}
    for label, kw in list(sizes.items())[:1] if quick else sizes.items():
        cfg = transformers.GPT2Config(**kw, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
        for dtype in dtypes:
            make = lambda impl: (
                transformers.GPT2LMHeadModel(cfg, attn_implementation=impl).cuda().to(dtype).eval()
            )
            hf, base = _hf_variants(make)
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
                ids = torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda")
                new = 64
                for n, m in (
                    ("hf-sdpa", hf["hf-sdpa"]),
                    ("hf-eager", hf["hf-eager"]),
                    ("fastlm", ours),
                ):
                    if n == "fastlm":
                        run = lambda m=m: m.generate(ids, max_new_tokens=new)
                    else:
                        run = lambda m=m: m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                     pad_token_id=0)  # fmt: skip
                    ms = bench_or_none(run, warmup_ms=1, rep_ms=1)
                    res.add(model=label, pass_="decode", impl=n, dtype=dtype, shape=dict(batch=batch, seq=128 + new),
                            ms=ms, tokens_per_s=batch * new / ms * 1e3 if ms else None)  # fmt: skip
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
