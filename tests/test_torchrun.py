"""The gptoss command under torchrun on the CPU (gloo, 2 ranks): generate and chat print what one process prints,
serve answers the official openai client, and finetune writes the whole adapter once. (The library-level checks of
tensor/expert parallelism are in test_parallel.py.)"""

import json
import os
import re
import subprocess
import sys

from conftest import free_port, interrupt, wait_until_serving
from gptoss.checkpoint import load_model
from gptoss.checkpoint_writer import write_checkpoint
from gptoss.config import preset
from gptoss.lora import add_lora, load_adapter
from gptoss.model import Transformer


def test_torchrun_generate_prints_what_one_process_prints(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", preset("tiny"), "original", seed=5)  # the tokenizer's vocabulary
    command = ["generate", str(folder), "-p", "The capital of France is", "-n", "12", "-t", "0", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    alone = subprocess.run([sys.executable, "-m", "gptoss", *command], capture_output=True, text=True, env=env)
    assert alone.returncode == 0, alone.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "-m", "gptoss", *command], capture_output=True, text=True, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout == alone.stdout
    assert "rank 0 of 2" in ranks.stderr


def test_torchrun_chat_answers_what_one_process_answers(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", preset("tiny"), "original", seed=6)
    # float32: in bf16 the output projection's partial sums round unlike one matmul's, and a tiny random model's
    # near-tied logits then pick other tokens
    command = ["chat", str(folder), "-n", "6", "-t", "0", "--device", "cpu", "--dtype", "float32", "--show-reasoning"]
    lines = "Hello there\nAnd again?\n/reset\nHello there\n"  # rank 0 reads them, every rank follows
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    alone = subprocess.run([sys.executable, "-m", "gptoss", *command], input=lines, capture_output=True, text=True,
                           env=env)
    assert alone.returncode == 0 and alone.stdout.count("assistant> ") == 3, alone.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "-m", "gptoss", *command], input=lines, capture_output=True, text=True, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    answers, answers_alone = ranks.stdout.split("assistant> "), alone.stdout.split("assistant> ")
    # every turn as one process answers it; turn 3 (after /reset) as turn 1
    assert answers[1:] == answers_alone[1:] and answers[1] == answers[3]
    prompts = [line.split(" tokens")[0] for line in ranks.stderr.splitlines() if line.startswith("[turn")]
    assert prompts == [line.split(" tokens")[0] for line in alone.stderr.splitlines() if line.startswith("[turn")]
    assert len(prompts) == 3  # rank 0 alone reports


def test_torchrun_finetune_writes_the_whole_adapter(tmp_path):
    """`torchrun ... finetune`: rank 0 alone reports, counting every parameter of the whole adapter once, and writes
    the whole adapter, which one process merges."""
    tiny = preset("tiny")
    folder = write_checkpoint(tmp_path / "ckpt", tiny, "original", seed=6)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."},
                                                        {"role": "assistant", "content": word}]})
                              for word in ("red", "green")) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gptoss",
                           "finetune", str(folder), "--data", str(data), "--out", str(tmp_path / "adapter"),
                           "--device", "cpu", "--rank", "2"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = re.findall(r"2 steps over 2 examples in .* s, loss [\d.]+ -> [\d.]+; adapter \(([\d,]+) parameters\)",
                         done.stderr)
    whole = sum(p.numel() for p in add_lora(Transformer(tiny, device="meta"), rank=2))
    assert reports == [f"{whole:,}"]
    load_adapter(load_model(folder, dequantize=True), tmp_path / "adapter")  # the whole model's shapes


def test_torchrun_serve(tmp_path):
    import openai

    folder = write_checkpoint(tmp_path / "ckpt", preset("tiny"), "original", seed=7)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "gptoss",
                             "serve", str(folder), "--device", "cpu", "--port", str(port), "--context", "512",
                             "--max-batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, base, 120)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hello"}]
        answers = [client.chat.completions.create(model="ckpt", messages=messages, max_tokens=6, temperature=0)
                   for _ in range(2)]
        assert all(r.usage.completion_tokens == 6 for r in answers)
        assert answers[0].choices[0].message == answers[1].choices[0].message  # greedy, the cache reused
    finally:
        interrupt(proc, 30)
