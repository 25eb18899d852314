import dataclasses
import importlib.util
import os

import pytest
import torch



def _interpret_triton() -> bool:
    """Without a CUDA GPU the Triton kernel tests run on the CPU through Triton's interpreter (tiny shapes; the
    test extra installs triton and numpy < 2.3, which the interpreter needs). GPTOSS_TRITON_INTERPRET_TESTS=0 or 1
    overrides the choice."""
    forced = os.environ.get("GPTOSS_TRITON_INTERPRET_TESTS")
    if forced is not None:
        return forced == "1"
    return not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which turns these options into workers
def pytest_cmdline_main(config) -> None:
    """Unless told otherwise (-n, --dist, --pdb), a run without a GPU spreads whole test files over up to 4
    processes when pytest-xdist is installed (the test extra installs it): most of the time goes to Triton's
    interpreter and to subprocesses, one core each, and on two cores the suite takes ~9 minutes instead of ~13. With
    a GPU the tests run in one process, so that they share neither the card's memory nor autotuning timings."""
    workers = min(4, os.cpu_count() or 1)
    if (config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput")  # not in a worker
            and config.option.numprocesses is None
            and config.option.dist == "no" and not config.option.usepdb and workers > 1
            and not torch.cuda.is_available()):
        config.option.numprocesses = workers
        config.option.dist = "loadfile"


TRITON_INTERPRET_TESTS = _interpret_triton()
if TRITON_INTERPRET_TESTS:
    os.environ["TRITON_INTERPRET"] = "1"  # before any test module imports triton

from gptoss.checkpoint_writer import fill_random, write_checkpoint
from gptoss.config import preset
from gptoss.model import Transformer

# A small vocabulary and a 16-token window keep CPU tests fast while sequences span several windows; the RoPE/YaRN
# constants stay the released ones.
SMALL = dataclasses.replace(preset("tiny"), vocab_size=1024, sliding_window=16)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def free_port() -> int:
    """A free TCP port for a server a test starts, below the kernel's ephemeral range: a port the kernel hands out
    for bind(0) could be given to another process's connection (gloo's, a client's) before the server binds it
    (seen in CI: "Address already in use"). Above 20000 and below torchrun's default rendezvous port, 29500."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    candidates = range(20000, min(ephemeral, 29500))
    for port in random.sample(candidates, min(len(candidates), 100)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # no such range here
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(proc, base: str, seconds: float) -> None:
    """Waits until a `gptoss serve` process answers /health; fails with its stderr if it exits first."""
    import time

    import httpx

    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "gptoss serve did not come up"
        time.sleep(0.2)


def interrupt(proc, seconds: float) -> int:
    """Ctrl-C for a server process: SIGINT, then its exit status (killed, and the test failed, if it hangs)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def run_test_script(path: str, *args, interpret: bool = False, timeout: float = 900) -> str:
    """Runs a test file as a script in a child process (gptoss importable from where this process imports it, and
    the test modules too), with Triton's interpreter on or off whatever this session uses: the build tests compile
    for CUDA targets, which the interpreter does not. Fails with the child's stderr; returns its stdout."""
    import subprocess
    import sys

    import gptoss

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(gptoss.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.path.dirname(path), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, path, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def require_triton_device():
    """For kernel test modules: skips the module unless Triton runs on a CUDA GPU or in the interpreter; returns
    the triton module."""
    triton = pytest.importorskip("triton")
    if not TRITON_INTERPRET_TESTS and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (or GPTOSS_TRITON_INTERPRET_TESTS=1)", allow_module_level=True)
    return triton


def random_model(config=SMALL, seed=0, dtype=torch.float32) -> Transformer:
    model = Transformer(config, dtype=dtype)
    fill_random(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """The same random weights (seed 1) in every released layout."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for layout, experts, shards in (("original", "mxfp4", 1), ("original", "mxfp4", 3), ("hf", "mxfp4", 2),
                                    ("hf", "dense", 2)):
        name = f"{layout}-{experts}-{shards}"
        folders[name] = write_checkpoint(root / name, SMALL, layout, experts, seed=1, num_shards=shards)
    return folders
