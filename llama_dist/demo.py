"""`llama-dist demo`: the whole pipeline on the bundled corpus in a few minutes on a laptop.

Tokenizer on the Python standard library -> pretokenized shards -> the tiny model
trained by torchrun on 2 processes at mp=2 (TensorBoard on) -> its checkpoint
resharded to mp=1 -> a sample generated from a prompt. A rerun reuses every stage
that is already done.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from llama_dist.config import load_config
from llama_dist.sources import parse_size


def stage(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def demo(root: Path, steps: int, max_bytes: int, prompt: str, max_gen_len: int) -> int:
    from llama_dist.checkpoint import latest_checkpoint
    from llama_dist.distributed import shutdown
    from llama_dist.generation import Llama
    from llama_dist.launcher import relaunch
    from llama_dist.prepare import prepare
    from llama_dist.reshard import reshard
    from llama_dist.tokenizer import train_tokenizer

    cfg = load_config("tiny")
    data_dir, run_dir = root / "data" / "stdlib", root / "runs" / "demo"
    tokenizer = root / "data" / "tokenizer" / "tokenizer.model"
    gpus = torch.cuda.device_count()
    nproc = 2 if gpus == 0 else min(2, gpus)  # NCCL needs one GPU per rank
    start = time.perf_counter()

    stage(1, f"tokenizer: {cfg.model.vocab_size}-token BPE on the Python standard library")
    if tokenizer.is_file():
        print(f"reusing {tokenizer}")
    else:
        train_tokenizer(["stdlib"], cfg.model.vocab_size, str(tokenizer.parent), max_bytes=max_bytes)

    stage(2, "pretokenize into shards")
    manifest = data_dir / "manifest.json"
    before = manifest.read_bytes() if manifest.is_file() else None
    prepare(["stdlib"], str(tokenizer), str(data_dir), max_bytes=max_bytes, val_fraction=0.05,
            overwrite=True)
    if before is not None and manifest.read_bytes() != before and run_dir.exists():
        print(f"the data changed: starting {run_dir} afresh")
        shutil.rmtree(run_dir)

    device = "GPU (nccl)" if gpus else "CPU (gloo, fp32)"
    how = f"torchrun on {nproc} processes" if nproc > 1 else "in this process (one GPU)"
    stage(3, f"train the tiny model: {how}, mp={nproc}, {device}")
    overrides = [f"parallel.mp={nproc}", f"data.dir={data_dir}", f"train.run_dir={run_dir}",
                 f"train.steps={steps}", f"checkpoint.interval={steps}", f"log.interval={max(1, steps // 10)}",
                 f"train.eval_interval={max(1, steps // 2)}"]
    code = relaunch("llama_dist.train", ["tiny", *overrides], nproc) if nproc > 1 else _train_here(overrides)
    if code != 0:
        print(f"training stopped with exit code {code}", file=sys.stderr)
        return code
    checkpoint = latest_checkpoint(run_dir)

    stage(4, f"reshard {checkpoint.name} from mp={nproc} to mp=1")
    single = run_dir / f"{checkpoint.name}-mp1"
    reshard(str(checkpoint), str(single), 1, force=True)
    print(f"wrote {single}")

    stage(5, f"generate from the prompt {prompt!r}")
    llama = Llama.build(str(single), str(single / "tokenizer.model"), max_seq_len=cfg.model.max_seq_len,
                        max_batch_size=1, model_parallel_size=1)
    result = llama.text_completion([prompt], temperature=0.8, top_p=0.95, max_gen_len=max_gen_len, echo=True)[0]
    shutdown()  # the process group Llama.build started
    print("-" * 60 + f"\n{result['generation']}\n" + "-" * 60)

    elapsed = time.perf_counter() - start
    overrides_text = " ".join(shlex.quote(o) for o in overrides[:3])
    print(f"""
done in {elapsed:.0f}s.
  run:         {run_dir}
  checkpoint:  {checkpoint}  (mp={nproc}; Meta format: consolidated.NN.pth + params.json)
               {single}  (resharded to mp=1)
  tensorboard: {run_dir / 'tensorboard'}

  look at the curves:  tensorboard --logdir {run_dir / 'tensorboard'}
  train on (resumes):  llama-dist train tiny {overrides_text} train.steps={2 * steps} --nproc {nproc}
  generate again:      llama-dist generate {single} --prompt {shlex.quote(prompt)}""")
    return 0


def _train_here(overrides: list[str]) -> int:
    from llama_dist.train import train

    return train(load_config("tiny", overrides))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-dist demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".", help="where data/ and runs/ go (default: here)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--max-bytes", type=parse_size, default=8_000_000,
                        help="how much of the standard library to use, e.g. 20M (default 8 MB)")
    parser.add_argument("--prompt", default="def ", help="the generation prompt")
    parser.add_argument("--max-gen-len", type=int, default=64)
    args = parser.parse_args(argv)
    if args.steps < 1:  # else the tokenizer and the data take minutes before every rank refuses it
        parser.error(f"--steps must be 1 or more, got {args.steps}")
    return demo(Path(args.dir), args.steps, args.max_bytes, args.prompt, args.max_gen_len)
