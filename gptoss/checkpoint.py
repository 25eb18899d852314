"""Loading released checkpoints (either layout) tensor by tensor onto the target device.

Peak host memory is about one tensor: each tensor is read from its safetensors file straight onto the device
and copied into its place in a model that was built on the meta device. A tensor/expert-parallel rank (a `Shard`)
reads only the slices of each tensor that it holds (see gptoss.parallel).
"""

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from gptoss import mxfp4
from gptoss.config import ModelConfig, read_config_json
from gptoss.errors import CheckpointError
from gptoss.layouts import DENSE, HF, MXFP4, ORIGINAL, Target, tensor_names
from gptoss.model import Transformer
from gptoss.parallel import SINGLE, Shard, held_ranges

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' dtype name, e.g. "BF16", "U8"

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * _SAFETENSORS_DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    layout: str  # ORIGINAL or HF
    experts: str  # MXFP4 or DENSE, as stored
    config: ModelConfig
    tensors: dict[str, TensorInfo]

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in {t.file for t in self.tensors.values()})


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Finds the layout, reads the config and every tensor header; raises CheckpointError/ConfigError."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder, got a file")
    if not (folder / "config.json").exists() and (folder / "original" / "config.json").exists():
        folder = folder / "original"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a gpt-oss repo root or its original/ folder)")
    raw = read_config_json(config_path)
    layout = HF if "model_type" in raw else ORIGINAL
    config = ModelConfig.from_dict(raw, source=str(config_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in _read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    experts = DENSE if layout == HF and "model.layers.0.mlp.experts.gate_up_proj" in tensors else MXFP4
    return CheckpointInfo(folder, layout, experts, config, tensors)


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Reads a safetensors header and checks that the file holds every byte the header promises."""
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a valid safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a valid safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = file.stat().st_size - 8 - header_len
    infos = {}
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(file, tuple(entry["shape"]), entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}") from None
        if end > data_len:
            raise CheckpointError(f"{file}: truncated (tensor {name!r} ends at byte {end}, file has {data_len})")
    return infos


def _expected_dtype(target_dtype: torch.dtype) -> tuple[str, ...]:
    return ("U8",) if target_dtype == torch.uint8 else ("BF16", "F16", "F32")


def _plan(info: CheckpointInfo, model_state: dict[str, torch.Tensor], dequantize: bool) -> dict[str, Target]:
    """Checks names, shapes and dtypes against what the model needs, before any tensor data is read."""
    names = tensor_names(info.config, info.layout, info.experts)
    for name in info.tensors:
        if name not in names:
            raise CheckpointError(f"{info.tensors[name].file}: unexpected tensor {name!r} for a {info.layout} layout")
    for name, target in names.items():
        if name not in info.tensors:
            raise CheckpointError(f"{info.folder}: missing tensor {name!r}")
        tensor = info.tensors[name]
        packed_into_dense = dequantize and target.key.endswith((".blocks", ".scales"))
        param = model_state[_dequantized_key(target.key) if packed_into_dense else target.key]
        if packed_into_dense:
            shape = param.shape[:-1] + (param.shape[-1] // mxfp4.BLOCK_SIZE,)
            expected = shape + (mxfp4.BLOCK_SIZE // 2,) if target.key.endswith(".blocks") else shape
            dtypes: tuple[str, ...] = ("U8",)
        else:
            expected = target.source_shape(tuple(param.shape))
            dtypes = _expected_dtype(param.dtype)
        if tensor.shape != tuple(expected):
            raise CheckpointError(
                f"{tensor.file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(expected)}"
            )
        if tensor.dtype not in dtypes:
            raise CheckpointError(f"{tensor.file}: tensor {name!r} has dtype {tensor.dtype}, expected {dtypes[0]}")
    return names


def _dequantized_key(key: str) -> str:
    """block.N.mlp.mlp1_weight.blocks|scales -> block.N.mlp.mlp1_weight.weight (dense target of a packed pair)."""
    if key.endswith((".blocks", ".scales")):
        return key.rsplit(".", 1)[0] + ".weight"
    return key


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    dequantize: bool = False,
    progress: bool | None = None,
    shard: Shard = SINGLE,
) -> Transformer:
    """Builds a Transformer from a checkpoint folder of either layout.

    dtype: parameters' dtype (norm gains stay float32). dequantize: store MXFP4 experts as dense `dtype` weights.
    progress: show a progress bar (default: when stderr is a terminal). shard: this rank's part of a
    tensor/expert-parallel model, of which only the slices it holds are read.
    """
    started = time.perf_counter()
    info = inspect_checkpoint(path)
    device = torch.device(device)
    dequantize = dequantize and info.experts == MXFP4
    expert_format = DENSE if dequantize or info.experts == DENSE else MXFP4
    with torch.device("meta"):
        full = Transformer(info.config, dtype=dtype, expert_format=expert_format)
        model = Transformer(info.config, dtype=dtype, expert_format=expert_format, shard=shard)
    full_state = full.state_dict()
    plan = _plan(info, full_state, dequantize)
    reads = {name: _pieces(plan[name], full_state, info, shard, dequantize) for name in info.tensors}
    model.to_empty(device=device)
    state = model.state_dict()
    packed_pairs = mxfp4.PairCollector()  # dequantize=True: blocks wait here for their scales
    files = sorted({t.file for t in info.tensors.values()})
    total = sum(_bytes_read(info.tensors[name], pieces) for name, pieces in reads.items())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=_quiet(progress))
    with torch.no_grad():
        for file in files:
            try:
                handle = safe_open(file, framework="pt", device=str(device))
            except Exception as err:  # safetensors raises its own exception types
                raise CheckpointError(f"{file}: cannot open ({err})") from None
            with handle:
                for name in handle.keys():
                    target = plan[name]
                    pieces = reads[name]
                    if pieces is None:
                        pieces = [((), ())]
                        source = handle.get_tensor(name)
                    else:
                        source = handle.get_slice(name)
                    for src, dst in pieces:
                        tensor = source[src]
                        if dequantize and target.key.endswith((".blocks", ".scales")):
                            pair = packed_pairs.add(target.key, tensor)  # one piece: this rank's experts
                            if pair is not None:
                                weight, blocks, scales = pair
                                mxfp4.dequantize_into(state[weight + ".weight"], blocks, scales)
                        elif reads[name] is None:
                            _put(state[target.key], target, tensor)
                        else:
                            _copy(state[target.key][dst], target, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
    bar.close()
    model.rope.reset_buffers()
    model.eval().requires_grad_(False)  # for inference; fine-tuning unfreezes what it trains
    log.info("loaded %s (%s layout, %s experts) in %.1f s", info.folder, info.layout, info.experts,
             time.perf_counter() - started)
    return model


Index = tuple[slice, ...]


def _pieces(target: Target, full_state: dict[str, torch.Tensor], info: CheckpointInfo, shard: Shard,
            dequantize: bool) -> list[tuple[Index, Index]] | None:
    """What a rank reads of one checkpoint tensor: None for all of it, else (source index, index into the rank's
    parameter) pairs, one per contiguous run of the rows or columns it holds."""
    key = _dequantized_key(target.key) if dequantize else target.key
    held = held_ranges(key, info.config, shard)
    if held is None:
        return None
    dim, ranges = held
    # the source covers indices [first, last) of the full parameter along dim: a row block for HF's q/k/v
    first, last = target.rows if target.rows is not None and dim == 0 else (0, full_state[key].shape[dim])
    pieces, offset = [], 0
    for start, stop in ranges:
        low, high = max(start, first), min(stop, last)
        if low < high:
            lead = (slice(None),) * dim
            dst_start = offset + low - start
            pieces.append((lead + (slice(low - first, high - first),),
                           lead + (slice(dst_start, dst_start + high - low),)))
        offset += stop - start
    return pieces


def _bytes_read(tensor: TensorInfo, pieces: list[tuple[Index, Index]] | None) -> int:
    """Bytes a rank reads of `tensor` (all of it, or the pieces `_pieces` chose)."""
    size = tensor.num_bytes
    if pieces is None:
        return size
    return sum(size * (index[-1].stop - index[-1].start) // tensor.shape[len(index) - 1] for index, _ in pieces)


def _quiet(progress: bool | None) -> bool:
    if progress is None:
        import sys

        return not sys.stderr.isatty()
    return not progress


def _put(param: torch.Tensor, target: Target, tensor: torch.Tensor) -> None:
    _copy(param if target.rows is None else param[target.rows[0] : target.rows[1]], target, tensor)


def _copy(dest: torch.Tensor, target: Target, tensor: torch.Tensor) -> None:
    dest.copy_(tensor.transpose(-1, -2) if target.transpose else tensor)
