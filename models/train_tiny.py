"""Train the tiny Llama LM shipped in `models/tiny_lm/`, and load it back.

    python -m models.train_tiny                 # the committed run: tokenizer + model -> models/tiny_lm/
    python -m models.train_tiny --steps 20 --out /tmp/tiny   # a quick smoke run

    model, tokenizer = load_tiny_lm()           # offline: the committed checkpoint, in eval mode
    ids = encode(tokenizer, "def f(x):\\n    return x\\n")

The model is the zoo's Llama (`models.build("llama-tiny", **MODEL_OVERRIDES)`), trained on the
training split of `models.corpus` (CPython 3.11.7 standard-library sources) with a byte-level BPE
tokenizer (`tokenizers`, vocab 4096) trained on the same split. Everything is seeded and the step
count is fixed, so a rerun with the same software and thread count reproduces the run; `--minutes` is only a safety cap
(hitting it is recorded in config.json as `stopped_early`). The run writes to `--out`:

    tokenizer.json         the BPE tokenizer
    model.safetensors      fp32 weights (the zoo state dict)
    config.json            ModelArgs, training settings, token counts, wall time, held-out perplexity
                           and the add-one unigram baseline's perplexity on the same tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models import build, model_args
from models.corpus import FILE_SEP, HELDOUT_EVERY, SOURCES_PATH, load_split
from models.metrics import perplexity, unigram_perplexity

TINY_DIR = Path(__file__).resolve().parent / "tiny_lm"
BASE_NAME = "llama-tiny"
VOCAB_SIZE = 4096
STATE_FILE = "train_state.pt"  # resumable training state, removed when the run completes

# 4.95 M parameters (2.1 M of them in the untied embedding and lm_head): 19.8 MB in fp32, under the
# 20 MB the checkpoint may take (6 layers would be 6.5 M parameters, 26 MB).
MODEL_OVERRIDES: dict[str, Any] = dict(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=672, vocab_size=VOCAB_SIZE, max_seq_len=256
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    # 2000 x 8 x 256 = 4.1 M tokens (2.2 epochs of the training split): about 20 min on 2 quiet cores
    # of an AMD EPYC (Zen 4) at ~3500 tok/s in fp32, about 30 min at the ~2200 tok/s measured while
    # the cores were shared with other jobs.
    steps: int = 2000
    batch: int = 8  # sequences per step
    seq: int = 256  # tokens per sequence (= max_seq_len)
    # Peak lr: of 1.5e-3, 3e-3 and 5e-3, 1.5e-3 gave the lowest held-out perplexity after 200 steps.
    lr: float = 1.5e-3  # linear warmup, then cosine to lr * min_lr_ratio
    warmup_steps: int = 80
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only (not norms)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    threads: int = 2
    log_every: int = 50
    eval_every: int = 250  # quick held-out estimate on eval_tokens tokens
    eval_tokens: int = 16384
    ckpt_every: int = 250  # resumable training state, for runs that get interrupted


# ---------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization, no special tokens) trained on `text`.

    Deterministic for a given `tokenizers` version (two trainings give byte-identical files; the
    trainer orders merges by count, ties by content).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_documents(text), trainer=trainer)
    return tok


def _documents(text: str) -> list[str]:
    """`text` cut before every FILE_SEP (one piece per corpus document).

    The byte-level pre-tokenizer never joins the separator to the newline before it, so encoding the
    pieces separately gives exactly the ids of encoding the whole text, only faster (in parallel).
    """
    pieces = text.split(FILE_SEP)
    out = [pieces[0]] if pieces[0] else []
    out.extend(FILE_SEP + p for p in pieces[1:])
    return out


def load_tokenizer(path: str | Path = TINY_DIR / "tokenizer.json"):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor (the same as `tokenizer.encode(text).ids`)."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(_documents(text)):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------------------
# training


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    max_minutes: float | None = None,
    stop_after: int | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train tokenizer and model with `cfg`, evaluate, and write them and config.json to `out`.

    `max_minutes` (a wall-clock cap) and `stop_after` (a step count) end the run before `cfg.steps`
    without changing the schedule, which is always planned for `cfg.steps`; config.json records it.
    Every `cfg.ckpt_every` steps the full training state (weights, optimizer, sampler RNG) goes to
    `out/train_state.pt`; with `resume`, a run continues from it exactly as if never interrupted.
    The file is deleted once the run completes.
    """
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    train_text, heldout_text = load_split("train"), load_split("heldout")
    tok = train_tokenizer(train_text)
    tok.save(str(out / "tokenizer.json"))
    train_ids, heldout_ids = encode(tok, train_text), encode(tok, heldout_text)
    print(
        f"corpus: train {len(train_text)} chars -> {train_ids.numel()} tokens, "
        f"heldout {len(heldout_text)} chars -> {heldout_ids.numel()} tokens "
        f"({time.perf_counter() - t_start:.1f}s)",
        flush=True,
    )

    model = build(BASE_NAME, seed=cfg.seed, **MODEL_OVERRIDES).train()
    args = model.args
    assert cfg.seq <= args.max_seq_len
    n_params = param_count(model)
    print(f"model: {BASE_NAME} {MODEL_OVERRIDES} -> {n_params} parameters", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=1e-8,
        fused=True,  # one kernel per step for all parameters: much faster on CPU than foreach
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_slice = heldout_ids[: cfg.eval_tokens]

    state_path = out / STATE_FILE
    first_step, train_seconds_before, resumes = 0, 0.0, 0
    loss_log: list[tuple[int, float]] = []
    ema = None
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["cfg"] != dataclasses.asdict(cfg) or state["model_overrides"] != MODEL_OVERRIDES:
            raise ValueError(f"{state_path} was written by a run with other settings; delete it to restart")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first_step, train_seconds_before = state["step"], state["train_seconds"]
        loss_log, ema, resumes = [tuple(x) for x in state["loss_log"]], state["ema"], state["resumes"] + 1
        print(f"resumed from {state_path} at step {first_step}", flush=True)

    def save_state(next_step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "cfg": dataclasses.asdict(cfg),
                "model_overrides": MODEL_OVERRIDES,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "step": next_step,
                "train_seconds": train_seconds_before + time.perf_counter() - t_train,
                "loss_log": loss_log,
                "ema": ema,
                "resumes": resumes,
            },
            tmp,
        )
        os.replace(tmp, state_path)  # atomic: a kill mid-save leaves the previous state intact

    t_train = time.perf_counter()
    stopped_early = False
    step = first_step
    for step in range(first_step, cfg.steps):
        if stop_after is not None and step >= stop_after:
            stopped_early = True
            break
        if max_minutes is not None and time.perf_counter() - t_start > 60.0 * max_minutes:
            stopped_early = True
            print(f"stopping early at step {step}: --minutes {max_minutes} reached", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, train_ids.numel() - cfg.seq - 1, (cfg.batch,), generator=gen)
        windows = torch.stack([train_ids[s : s + cfg.seq + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(windows[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if (step + 1) % cfg.log_every == 0 or step == 0:
            elapsed = time.perf_counter() - t_train
            tps = (step + 1 - first_step) * cfg.batch * cfg.seq / elapsed
            loss_log.append((step + 1, round(value, 4)))
            print(
                f"step {step + 1:5d}/{cfg.steps}  loss {value:.4f}  ema {ema:.4f}  "
                f"lr {_lr_at(step, cfg):.2e}  {tps:.0f} tok/s  {(train_seconds_before + elapsed) / 60:.1f} min",
                flush=True,
            )
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            ppl = perplexity(model, eval_slice, seq=cfg.seq)
            model.train()
            print(f"  held-out ppl (first {eval_slice.numel()} tokens): {ppl:.3f}", flush=True)
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save_state(step + 1)
    else:
        step = cfg.steps
    steps_done = step
    train_seconds = train_seconds_before + time.perf_counter() - t_train

    model.eval()
    t_eval = time.perf_counter()
    heldout_ppl = perplexity(model, heldout_ids, seq=cfg.seq)
    train_slice_ppl = perplexity(model, train_ids[: cfg.eval_tokens * 2], seq=cfg.seq)
    unigram_ppl = unigram_perplexity(train_ids, heldout_ids, VOCAB_SIZE)
    eval_seconds = time.perf_counter() - t_eval
    print(
        f"held-out perplexity {heldout_ppl:.3f} (unigram baseline {unigram_ppl:.3f}; "
        f"first {cfg.eval_tokens * 2} train tokens {train_slice_ppl:.3f}) [{eval_seconds:.0f}s]",
        flush=True,
    )

    save_checkpoint(model, out / "model.safetensors")
    import tokenizers

    config = {
        "description": "Tiny Llama LM trained by models/train_tiny.py on models/data/corpus.txt.xz "
        "(CPython 3.11.7 standard-library sources, PSF License 2.0; see models/data/SOURCES.txt)",
        "base": BASE_NAME,
        "model_overrides": MODEL_OVERRIDES,
        "model_args": dataclasses.asdict(args),
        "param_count": n_params,
        "dtype": "float32",
        "tokenizer": {
            "file": "tokenizer.json",
            "kind": "byte-level BPE (tokenizers), trained on the train split",
            "vocab_size": tok.get_vocab_size(),
        },
        "train": {**dataclasses.asdict(cfg), "steps_done": steps_done, "stopped_early": stopped_early,
                  "max_minutes": max_minutes, "resumes": resumes},
        "data": {
            "sources": SOURCES_PATH.name,
            "split": f"by file: every {HELDOUT_EVERY}th file held out",
            "train_tokens": train_ids.numel(),
            "heldout_tokens": heldout_ids.numel(),
            "tokens_trained": steps_done * cfg.batch * cfg.seq,
            "epochs": round(steps_done * cfg.batch * cfg.seq / train_ids.numel(), 3),
        },
        "results": {
            "heldout_perplexity": round(heldout_ppl, 4),
            "unigram_heldout_perplexity": round(unigram_ppl, 4),
            "train_slice_perplexity": round(train_slice_ppl, 4),  # first 2 * eval_tokens train tokens
            "eval_seq": cfg.seq,
            "final_train_loss": loss_log[-1][1] if loss_log else None,
        },
        "timing": {
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "tokens_per_second": round(steps_done * cfg.batch * cfg.seq / max(train_seconds, 1e-9), 1),
        },
        "software": {
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
        "loss_log": loss_log,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not stopped_early:
        state_path.unlink(missing_ok=True)
    print(f"wrote {out} in {config['timing']['total_seconds'] / 60:.1f} min", flush=True)
    return config


# ---------------------------------------------------------------------------------------------------
# checkpoint


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})  # one key: the header is byte-stable


def load_tiny_lm(
    path: str | Path = TINY_DIR, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """(model, tokenizer) from a trained directory (default: the committed `models/tiny_lm/`).

    The model is the zoo Llama with the ModelArgs recorded in config.json, in eval mode.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    overrides = dict(config["model_overrides"])
    # The recorded ModelArgs must be what the zoo builds from the overrides today.
    args = model_args(config["base"], **overrides)
    if dataclasses.asdict(args) != config["model_args"]:
        raise ValueError(f"zoo {config['base']} with {overrides} no longer matches {path / 'config.json'}")
    model = build(config["base"], **overrides)  # fp32 on CPU; the RoPE tables are derived from args
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=TINY_DIR, help="output directory (default: models/tiny_lm)")
    p.add_argument("--minutes", type=float, default=None, help="safety cap on wall time (default: none)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{STATE_FILE} if present")
    p.add_argument("--steps", type=int, default=None, help=f"override the step count ({TrainConfig.steps})")
    ns = p.parse_args(argv)
    cfg = TrainConfig()
    if ns.steps is not None:
        cfg = dataclasses.replace(cfg, steps=ns.steps, warmup_steps=min(cfg.warmup_steps, max(1, ns.steps // 10)),
                                  eval_every=0 if ns.steps < cfg.eval_every else cfg.eval_every)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    train(cfg, ns.out, max_minutes=ns.minutes, resume=ns.resume)


if __name__ == "__main__":
    # libgomp's default busy-waiting makes torch's 2 threads crawl (5-10x slower, measured) whenever
    # another process shares the cores; passive waiting costs nothing on a quiet machine. It must be
    # set before the OpenMP runtime starts (torch is already imported here), hence the re-exec.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "models.train_tiny", *sys.argv[1:]])
    main()
