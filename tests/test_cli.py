import os
import re
import subprocess
import sys

import pytest

from gptoss.checkpoint import inspect_checkpoint


def gptoss(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptoss.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_the_commands():
    result = gptoss("--help")
    assert result.returncode == 0
    for command in ("generate", "init-checkpoint"):
        assert command in result.stdout


def test_generate_on_the_demo_checkpoint(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    result = gptoss("generate", "-p", "Hello", "-n", "8", "--seed", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")
    assert "output is noise" in result.stderr
    assert "prompt 1 tokens at" in result.stderr and "decode 8 tokens at" in result.stderr
    assert (tmp_path / "gptoss" / "demo-tiny-v1" / "model.safetensors").exists()
    again = gptoss("generate", "-p", "Hello", "-n", "8", "--seed", "0", env=env)
    assert again.stdout == result.stdout  # the demo is written once and seeded sampling repeats


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_init_checkpoint_writes_a_loadable_folder(tmp_path, layout):
    out = tmp_path / "ckpt"
    result = gptoss("init-checkpoint", str(out), "--preset", "tiny", "--layout", layout, "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert inspect_checkpoint(out).layout == layout
    again = gptoss("init-checkpoint", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_prompt_longer_than_the_context(tmp_path):
    result = gptoss("generate", "-p", "word " * 50, "-n", "20", "--context", "32",
                    env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert re.fullmatch(r"gptoss: error: prompt of \d+ tokens \+ 20 to generate exceeds the context length of 32",
                        result.stderr.strip().splitlines()[-1])
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["generate", "-p", "Hello"], ["chat"]])
def test_bad_sampling_setting(tmp_path, command):
    result = gptoss(*command, "-n", "4", "--top-p", "0", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["gptoss: error: top_p must be in (0, 1], got 0.0"]  # before loading
    assert result.stdout == ""


def test_float32_is_for_the_cpu(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    on_cpu = gptoss("generate", "-p", "Hello", "-n", "4", "--seed", "0", "--dtype", "float32", env=env)
    assert on_cpu.returncode == 0 and on_cpu.stdout.startswith("Hello"), on_cpu.stderr
    on_gpu = gptoss("generate", "-p", "Hello", "-n", "4", "--dtype", "float32", "--device", "cuda", env=env)
    assert on_gpu.returncode == 2 and on_gpu.stderr.strip().splitlines()[-1] == (
        "gptoss: error: --dtype float32 runs on the CPU only: the GPU kernels compute in bfloat16")


def test_serve_refuses_a_busy_port_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = gptoss("serve", str(tmp_path / "no-such-checkpoint"), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gptoss: error: cannot listen on 127.0.0.1:{port}: "
                                                  "Address already in use"]


@pytest.mark.parametrize("command, option", [("serve", "--max-batch-size"), ("serve", "--max-prefill-tokens"),
                                             ("bench", "--serve"), ("bench", "--max-prefill-tokens")])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_engine_limits_must_be_positive(command, option, value):
    result = gptoss(command, option, value)
    assert result.returncode == 2 and f"expected a positive integer, got '{value}'" in result.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_port_out_of_range(port):
    result = gptoss("serve", "--port", port)
    assert result.returncode == 2 and f"expected a port number 0-65535, got '{port}'" in result.stderr


def test_argument_errors_answer_before_torch_loads():
    """`gptoss --help` and argument errors need no torch (seconds to import): the package imports the model
    classes on first use."""
    probe = ("import sys, gptoss, gptoss.cli; from gptoss import GptOssError; "
             "assert 'torch' not in sys.modules, 'torch imported'; "
             "from gptoss import Transformer; assert 'torch' in sys.modules")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version(capsys):
    from importlib.metadata import version

    from gptoss.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"gptoss {version('gptoss')}\n"
