"""The model paths on this CPU, each against transformers' sdpa in the same process: what a
user of fastlm without a GPU gets (issue-style table, committed to benchmarks/results/cpu/).

* BERT-base (random weights), batch 16 x seq 256, ~45% padding, forward under
  torch.inference_mode: fastlm.models.BertModel, transformers + fastlm.optimize(), and
  transformers with attn_implementation="fastlm";
* GPT-2 124M (random weights), a 32-token prompt and 64 greedy tokens, batch 1 and a
  left-padded batch 4: fastlm's generate against transformers' generate.

Timing: wall clock (there is no device to synchronize), median of ``--repeats`` runs
(default 5) after one warm-up, torch threads as the machine sets them. CPU timings say what
this path costs on this machine; they prove nothing about GPU speed.

    python -m benchmarks.bench_models_cpu          # -> benchmarks/results/cpu/models_cpu.*
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from benchmarks.bench_models import _mask
from benchmarks.harness import Results


def wall_median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first-call caches, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bert_rows(res: Results, repeats: int, batch: int, seq: int) -> None:
    import transformers

    import fastlm
    import fastlm.models as fm

    cfg = transformers.BertConfig()
    sdpa = transformers.AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    as_fastlm = transformers.AutoModel.from_config(cfg, attn_implementation="fastlm").eval()
    as_fastlm.load_state_dict(sdpa.state_dict())
    optimized = fastlm.optimize(copy.deepcopy(sdpa))
    ours = fm.BertModel.from_hf(sdpa).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = _mask(batch, seq, True, "cpu")
    shape = dict(batch=batch, seq=seq, padding=round(1 - mask.float().mean().item(), 3))
    paths = {
        "hf-sdpa": sdpa,
        "fastlm.models.BertModel": ours,
        "hf + fastlm.optimize": optimized,
        'hf attn_implementation="fastlm"': as_fastlm,
    }
    times = {}
    with torch.inference_mode():
        for name, model in paths.items():
            times[name] = wall_median_ms(lambda m=model: m(ids, attention_mask=mask), repeats)
    for name, ms in times.items():
        res.add(
            model="bert-base", impl=name, shape=shape, ms=ms, speedup_vs_sdpa=times["hf-sdpa"] / ms
        )


def gpt2_rows(res: Results, repeats: int, batch: int, prompt: int = 32, new: int = 64) -> None:
    import transformers

    import fastlm.models as fm

    cfg = transformers.GPT2Config()
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ours = fm.GPT2LMHeadModel.from_hf(hf).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt))
    mask = torch.ones(batch, prompt, dtype=torch.long)
    for b in range(1, batch):  # left padding of different lengths
        mask[b, : 3 * b] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0)  # fmt: skip
    times = {}
    with torch.inference_mode():
        times["hf-sdpa"] = wall_median_ms(lambda: hf.generate(ids, **kw), repeats)
        times["fastlm GPT2LMHeadModel"] = wall_median_ms(lambda: ours.generate(ids, **kw), repeats)
    shape = dict(batch=batch, prompt=prompt, new_tokens=new)
    for name, ms in times.items():
        res.add(model="gpt2-124M", impl=name, shape=shape, ms=ms,
                tokens_per_s=batch * new / ms * 1e3, speedup_vs_sdpa=times["hf-sdpa"] / ms)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (smoke run)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    res = Results("models_cpu", args.out)
    repeats = 2 if args.quick else args.repeats
    bert_rows(res, repeats, *((2, 32) if args.quick else (16, 256)))
    for batch in (1, 4):
        gpt2_rows(res, repeats, batch, new=4 if args.quick else 64)
    res.save(table_cols=["model", "impl", "shape", "ms", "tokens_per_s", "speedup_vs_sdpa"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
