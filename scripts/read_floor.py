"""How fast can one decode step's mlp1 expert bytes be read at all? The floor under the MoE GEMV's time.

At one token, mlp1 reads 4 experts' packed rows: 4 contiguous regions of 8.3 MB (20b shapes), 33 MB in all. Two
read-only kernels (no FP4 decode, no math beyond an XOR) time that read, rotating over 8 layers' worth of weights so
that nothing comes from L2, each timed on the GPU inside a CUDA graph (a launch from Python takes longer than these
kernels run):
  * rows: the GEMV's grid and tile shape (program (expert, row block) walks its rows' 32-bit words in steps);
  * flat: each program reads one contiguous chunk of an expert's region.
and a 256 MB device copy gives the card's streaming rate for comparison.

  python scripts/read_floor.py
"""

import torch
import triton
import triton.language as tl
import triton.testing

E, ROWS, H, LAYERS = 32, 5760, 2880, 8  # 20b mlp1: 2I = 5760 rows of H = 2880 inputs (1440 bytes)
WORDS = ROWS * H // 8  # int32 words an expert
NBYTES = 4 * WORDS * 4


@triton.jit
def _rows_kernel(w_ptr, ids_ptr, out_ptr, KW: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, ROWS_E: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    rows = tl.load(ids_ptr + i).to(tl.int64) * ROWS_E + j * R + tl.arange(0, R)
    acc = tl.zeros((R, BK // 8), dtype=tl.int32)
    for k0 in range(0, KW, BK // 8):
        kk = k0 + tl.arange(0, BK // 8)
        acc ^= tl.load(w_ptr + rows[:, None] * KW + kk[None, :], mask=(kk < KW)[None, :], other=0)
    tl.store(out_ptr + i * 4096 + j, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _flat_kernel(w_ptr, ids_ptr, out_ptr, EW: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    base = tl.load(ids_ptr + i).to(tl.int64) * EW + j * CHUNK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for k0 in range(0, CHUNK, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + base + offs, mask=j * CHUNK + offs < EW, other=0)
    tl.store(out_ptr + i * 4096 + j, tl.sum(acc, 0))


def per_call_us(call, calls=LAYERS):
    """GPU microseconds per call of `call`: `calls` calls (one per layer's weights) timed by CUDA-graph replay, so
    that host launch time is not counted."""
    return triton.testing.do_bench_cudagraph(lambda: [call() for _ in range(calls)], rep=50) * 1000 / calls


def main():
    if not torch.cuda.is_available():
        raise SystemExit("read_floor.py: needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}; 4 experts' mlp1 bytes: {NBYTES / 1e6:.1f} MB", flush=True)
    weights = [torch.randint(0, 2**31 - 1, (E * WORDS,), dtype=torch.int32, device="cuda") for _ in range(LAYERS)]
    ids = [torch.randperm(E, device="cuda")[:4].to(torch.int32) for _ in range(LAYERS)]
    out = torch.zeros(4 * 4096, dtype=torch.int32, device="cuda")
    turn = {"i": 0}

    def layer():
        turn["i"] += 1
        return weights[turn["i"] % LAYERS], ids[turn["i"] % LAYERS]

    for r, bk, warps in [(64, 256, 4), (64, 512, 4), (32, 512, 4), (128, 512, 8), (64, 1024, 8), (16, 512, 2)]:
        def call():
            w, e = layer()
            _rows_kernel[(4, ROWS // r)](w, e, out, KW=H // 8, R=r, BK=bk, ROWS_E=ROWS, num_warps=warps)
        us = per_call_us(call)
        print(f"rows R{r} BK{bk} w{warps}: {us:.1f} us -> {NBYTES / us / 1e6:.2f} TB/s", flush=True)
    for chunk, block, warps in [(8192, 1024, 4), (16384, 2048, 4), (32768, 2048, 8), (65536, 4096, 8),
                                (4096, 1024, 4), (16384, 4096, 8), (131072, 4096, 8)]:
        grid = (4, triton.cdiv(WORDS, chunk))

        def call():
            w, e = layer()
            _flat_kernel[grid](w, e, out, EW=WORDS, CHUNK=chunk, BLOCK=block, num_warps=warps)
        us = per_call_us(call)
        print(f"flat chunk {chunk * 4 // 1024} KB block {block} w{warps} ({grid[1] * 4} programs): {us:.1f} us -> "
              f"{NBYTES / us / 1e6:.2f} TB/s", flush=True)
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = per_call_us(lambda: dst.copy_(src), calls=1)
    print(f"copy 256 MB: {us:.0f} us -> {2 * src.numel() / us / 1e6:.2f} TB/s read + write", flush=True)


if __name__ == "__main__":
    main()
