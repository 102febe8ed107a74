"""Block-quantized weights in onnxruntime's `com.microsoft.MatMulNBits` layout, from GPTQ or from plain RTN.

MatMulNBits computes `y = x @ dequant(B)^T` with B quantized in blocks of `block_size` along K (the input
features), each block with its own scale and zero point: `w = (code - zero_point) * scale`. The layout
(checked bit for bit against ORT 1.32's CPU kernel in tests/test_onnx_graph.py):

- B uint8 [N, n_blocks, block_size * bits / 8], codes packed low bits first along K;
- scales float32 [N, n_blocks];
- zero_points uint8 [N, ceil(n_blocks * bits / 8)], packed low bits first along the blocks; or, when a zero
  point does not fit in `bits` bits, float32 [N, n_blocks] (the "unpacked" form the op also accepts).

GPTQ (AutoGPTQ / gptqmodel "gptq" v1 checkpoints) stores the transpose: qweight int32 [K / (32/bits), N]
packing codes along K lowest bits first, qzeros int32 [n_groups, N / (32/bits)] packing along N, scales
fp16 [n_groups, N], g_idx int32 [K] (the group of each input row). v1 stores each zero point minus one, so
the dequantized weight is `scale * (q - (stored_zero + 1))`; "gptq_v2" stores it as is. The conversion is a
pure re-packing: `dequantize_matmulnbits(gptq_to_matmulnbits(...)) == dequantize_gptq(...)` exactly.

Two shape rules are handled here rather than in the graph:

- K not a multiple of the block (SmolLM2's K=576 with group 128): the last block is padded with codes equal
  to that block's zero point, so padded entries dequantize to exactly 0 whatever the kernel does with them.
- Act-order (desc_act) checkpoints, whose g_idx is a permutation of contiguous groups: MatMulNBits' own
  g_idx input is deprecated, and with packed zero points ORT 1.32's CPU kernel returns wrong results when
  it is given (even an identity g_idx; measured). So K is permuted instead: the columns are stored sorted by
  group and the graph gathers the activations with the same permutation (`NBitsWeight.perm`) before the
  matmul, which is exact since x @ W^T = x[:, perm] @ W[:, perm]^T.

The packing and RTN code are written by hand in numpy: onnxruntime's MatMulNBitsQuantizer works on whole
ONNX models and quantizes from float, it cannot re-pack existing GPTQ codes without re-rounding them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from runtime.errors import EdgepackError

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class NBitsWeight:
    """One linear layer's weight in MatMulNBits form. Logical weight W is [N, K] (torch Linear layout)."""

    B: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: (
        np.ndarray | None
    )  # uint8 packed [N, ceil(n_blocks*bits/8)], float32 [N, n_blocks], or None (= 2^(bits-1))
    K: int
    N: int
    bits: int = 4
    block_size: int = 128
    perm: np.ndarray | None = None  # int64 [K]: the node sees x[..., perm]; None = identity
    offsets: np.ndarray | None = None  # float32 [N, n_blocks]: added per block, W = dequant + offset (grid-exact)

    @property
    def n_blocks(self) -> int:
        return self.B.shape[1]

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        extra = (0 if self.perm is None else self.perm.nbytes) + (0 if self.offsets is None else self.offsets.nbytes)
        return self.B.nbytes + self.scales.nbytes + zp + extra


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise EdgepackError(f"bits={bits}: MatMulNBits packing supports {SUPPORTED_BITS}")


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgepackError(f"block_size={block_size}: MatMulNBits needs a power of two >= 16")


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) along the last axis into uint8, lowest bits first."""
    per_byte = 8 // bits
    codes = np.asarray(codes, dtype=np.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = codes.reshape(codes.shape[:-1] + (-1, per_byte))
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= grouped[..., i] << np.uint8(bits * i)
    return out


def unpack_low_first(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of pack_low_first: uint8 [..., M] -> codes [..., M * 8/bits] (cut to `count`)."""
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    packed = np.asarray(packed, dtype=np.uint8)
    parts = [(packed >> np.uint8(bits * i)) & mask for i in range(per_byte)]
    codes = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return codes if count is None else codes[..., :count]


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """GPTQ int32 words (32/bits codes per word, lowest bits first) unpacked along `axis` (0 or 1)."""
    _check_bits(bits)
    per_word = 32 // bits
    words = np.asarray(packed).astype(np.int64) & 0xFFFFFFFF  # the stored int32 bit pattern, unsigned
    shifts = np.arange(0, 32, bits, dtype=np.int64)
    mask = (1 << bits) - 1
    if axis == 0:  # [R, C] -> [R * per_word, C]
        codes = (words[:, None, :] >> shifts[None, :, None]) & mask
        return codes.reshape(words.shape[0] * per_word, words.shape[1]).astype(np.uint8)
    codes = (words[:, :, None] >> shifts[None, None, :]) & mask  # [R, C] -> [R, C * per_word]
    return codes.reshape(words.shape[0], words.shape[1] * per_word).astype(np.uint8)


def _gptq_codes(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int):
    """Unpacked GPTQ tensors: codes [K, N] uint8, zeros [G, N] int (offset applied), scales [G, N] f32, g [K]."""
    scales = np.asarray(scales, dtype=np.float32)
    n_groups, n = scales.shape
    q = unpack_int32(qweight, bits, axis=0)  # [K_packed, N]
    z = unpack_int32(qzeros, bits, axis=1)[:, :n].astype(np.int32) + zero_offset  # [G, N]
    if g_idx is None:
        raise EdgepackError("GPTQ tensors need g_idx (or pass g_idx=np.arange(K) // group_size)")
    g = np.asarray(g_idx).astype(np.int64).reshape(-1)
    k = g.size
    if q.shape[0] < k or q.shape[1] != n or z.shape[0] != n_groups:
        raise EdgepackError(
            f"GPTQ shapes disagree: qweight {q.shape}, qzeros {z.shape}, scales {scales.shape}, g_idx {g.shape}"
        )
    if g.min() < 0 or g.max() >= n_groups:
        raise EdgepackError(f"GPTQ g_idx has groups outside [0, {n_groups})")
    return q[:k], z, scales, g


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int = 4, zero_offset: int = 1) -> np.ndarray:
    """float32 W [N, K] = scale * (q - (stored_zero + zero_offset)), group of input row k = g_idx[k].
    zero_offset=1 for "gptq" (v1) checkpoints, 0 for "gptq_v2"."""
    q, z, s, g = _gptq_codes(qweight, qzeros, scales, g_idx, bits, zero_offset)
    w = s[g] * (q.astype(np.float32) - z[g].astype(np.float32))  # [K, N]
    return np.ascontiguousarray(w.T)


def act_order_permutation(g_idx: np.ndarray, group_size: int) -> np.ndarray | None:
    """The K permutation that makes groups contiguous (None if they already are).

    GPTQ with desc_act quantizes columns in a permuted order and records g_idx[k] = rank(k) // group_size; a
    stable sort by group recovers blocks of exactly group_size rows. Any other g_idx cannot be expressed as
    MatMulNBits blocks and is refused."""
    g = np.asarray(g_idx).astype(np.int64).reshape(-1)
    contiguous = np.arange(g.size) // group_size
    if np.array_equal(g, contiguous):
        return None
    perm = np.argsort(g, kind="stable")
    if not np.array_equal(g[perm], contiguous):
        raise EdgepackError(
            f"GPTQ g_idx is not a permutation of contiguous groups of {group_size}; cannot map to MatMulNBits"
        )
    return perm.astype(np.int64)


def _block_for_group(group_size: int, k: int) -> int:
    if group_size in (-1, 0) or group_size >= k:  # one group over all of K (per-channel)
        block = 16
        while block < k:
            block *= 2
        return block
    _check_block(group_size)
    return group_size


def gptq_to_matmulnbits(
    qweight, qzeros, scales, g_idx, bits: int = 4, group_size: int = 128, zero_offset: int = 1
) -> NBitsWeight:
    """Re-pack one GPTQ linear layer for MatMulNBits, bit-exactly (see module docstring).

    qweight int32 [K/(32/bits), N], qzeros int32 [G, N/(32/bits)], scales [G, N], g_idx [K]. Returns the
    packed weight; `perm` is set for act-order checkpoints and the graph must gather x with it."""
    _check_bits(bits)
    q, z, s, g = _gptq_codes(qweight, qzeros, scales, g_idx, bits, zero_offset)
    k, n = q.shape
    block = _block_for_group(group_size, k)
    perm = act_order_permutation(g, group_size if block == group_size else k)
    if perm is not None:
        q, g = q[perm], g[perm]
    n_blocks = -(-k // block)
    # After the optional permutation, block b holds input rows [b*block, (b+1)*block) and uses GPTQ group b.
    groups_of_blocks = g[np.minimum(np.arange(n_blocks) * block, k - 1)]
    zeros = z[groups_of_blocks].T  # [N, n_blocks]
    scales_nb = np.ascontiguousarray(s[groups_of_blocks].T, dtype=np.float32)  # [N, n_blocks]
    codes = np.empty((n, n_blocks * block), np.uint8)
    codes[:, :k] = q.T
    if n_blocks * block > k:  # pad with the block's zero point: padded weights dequantize to exactly 0
        codes[:, k:] = np.clip(zeros[:, -1:], 0, (1 << bits) - 1).astype(np.uint8)
    B = pack_low_first(codes.reshape(n, n_blocks, block), bits)
    if np.all(zeros == 1 << (bits - 1)):  # symmetric: MatMulNBits' default zero point, nothing to store
        zp = None
    elif zeros.min() >= 0 and zeros.max() < (1 << bits):
        zp = pack_low_first(zeros.astype(np.uint8), bits)
    else:  # v1 zero 15 + 1 = 16 does not fit in 4 bits: use the float ("unpacked") zero-point form, exact too
        zp = zeros.astype(np.float32)
    return NBitsWeight(B=B, scales=scales_nb, zero_points=zp, K=k, N=n, bits=bits, block_size=block, perm=perm)


def split_blocks(w: NBitsWeight, block_size: int) -> NBitsWeight:
    """The same weight in blocks of `block_size` (a divisor of its block): each block's scale, zero point
    and offset repeat over its sub-blocks, so it dequantizes to exactly the same values. More bytes (a scale
    per sub-block), but onnxruntime's int4 kernels read block-32 weights faster than block-128 ones on some
    CPUs (benchmarks/nbits_block_speed.py)."""
    _check_block(block_size)
    if block_size >= w.block_size:
        return w
    if w.block_size % block_size:
        raise EdgepackError(f"block_size={block_size} does not divide the weight's block {w.block_size}")
    f = w.block_size // block_size
    keep = -(-w.K // block_size)  # the last sub-blocks may be padding only: MatMulNBits wants ceil(K / block)
    B = w.B.reshape(w.N, w.n_blocks * f, block_size * w.bits // 8)[:, :keep]
    scales = np.repeat(w.scales, f, axis=1)[:, :keep]
    zp = w.zero_points
    if zp is not None and zp.dtype == np.uint8:
        zp = pack_low_first(np.repeat(unpack_low_first(zp, w.bits, w.n_blocks), f, axis=1)[:, :keep], w.bits)
    elif zp is not None:
        zp = np.repeat(zp, f, axis=1)[:, :keep]
    offsets = None if w.offsets is None else np.repeat(w.offsets, f, axis=1)[:, :keep]
    return dataclasses.replace(
        w,
        B=np.ascontiguousarray(B),
        scales=np.ascontiguousarray(scales),
        zero_points=zp,
        block_size=block_size,
        offsets=offsets,
    )


def dequantize_matmulnbits(w: NBitsWeight) -> np.ndarray:
    """float32 W [N, K] in the original input order, computed as MatMulNBits defines it."""
    codes = unpack_low_first(w.B, w.bits).astype(np.float32)  # [N, n_blocks, block]
    if w.zero_points is None:
        zeros = np.full((w.N, w.n_blocks), float(1 << (w.bits - 1)), np.float32)
    elif w.zero_points.dtype == np.uint8:
        zeros = unpack_low_first(w.zero_points, w.bits, w.n_blocks).astype(np.float32)
    else:
        zeros = np.asarray(w.zero_points, np.float32)
    deq = (codes - zeros[:, :, None]) * w.scales[:, :, None]
    if w.offsets is not None:
        deq = deq + w.offsets[:, :, None]
    deq = deq.reshape(w.N, -1)[:, : w.K]
    if w.perm is None:
        return np.ascontiguousarray(deq)
    out = np.empty_like(deq)
    out[:, w.perm] = deq
    return out


def quantize_rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> NBitsWeight:
    """Round-to-nearest block quantization of a float weight W [N, K] (for recipes without GPTQ, and the
    embedding / LM head, which GPTQ leaves in float).

    Symmetric centres the codes on the zero point 2^(bits-1) and maps max|w| to ±(2^(bits-1) - 1/2) steps, so
    both ends of the range [-8, 7] are used and no value is off by more than half a step (llama.cpp's Q4_0
    uses max/-8 instead and clips the opposite extreme by up to a whole step).
    Asymmetric maps [min, max] of each block (widened to include 0) onto [0, 2^bits - 1]."""
    _check_bits(bits)
    _check_block(block_size)
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        scales = np.abs(blocks).max(axis=-1) / (mid - 0.5)
        zeros = np.full((n, n_blocks), mid, np.int32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scales = (hi - lo) / qmax
        safe = np.where(scales == 0, 1.0, scales)
        zeros = np.clip(np.round(-lo / safe), 0, qmax).astype(np.int32)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.round(blocks / safe[..., None]) + zeros[..., None], 0, qmax).astype(np.uint8)
    if n_blocks * block_size > k:  # padded tail: the zero point, so it dequantizes to 0
        codes.reshape(n, -1)[:, k:] = zeros[:, -1:].astype(np.uint8)
    zp = None if symmetric else pack_low_first(zeros.astype(np.uint8), bits)  # symmetric = the op's default
    return NBitsWeight(
        B=pack_low_first(codes, bits),
        scales=scales.astype(np.float32),
        zero_points=zp,
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
    )


def quantize_rtn_int4(w_fp32: np.ndarray, block_size: int = 32, symmetric: bool = True) -> NBitsWeight:
    return quantize_rtn(w_fp32, bits=4, block_size=block_size, symmetric=symmetric)


def concat_nbits(parts: list[NBitsWeight]) -> NBitsWeight:
    """Stack weights that share K, bits, block size and input permutation along N (fused q/k/v, gate/up)."""
    first = parts[0]
    for p in parts[1:]:
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and np.array_equal(p.perm, first.perm)
        )
        if (p.K, p.bits, p.block_size) != (first.K, first.bits, first.block_size) or not same_perm:
            raise EdgepackError("cannot fuse MatMulNBits weights with different K, bits, block size or permutation")
    kinds = {None if p.zero_points is None else p.zero_points.dtype for p in parts}
    if len(kinds) == 1:
        zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts], axis=0)
    elif kinds == {None, np.dtype(np.uint8)}:  # the default zero point, packed explicitly (keeps the fast kernel)
        zp = pack_low_first(np.concatenate([_float_zeros(p) for p in parts], axis=0).astype(np.uint8), first.bits)
    else:  # mixed forms: unpack all to float
        zp = np.concatenate([_float_zeros(p) for p in parts], axis=0)
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = np.concatenate(
            [p.offsets if p.offsets is not None else np.zeros((p.N, p.n_blocks), np.float32) for p in parts], axis=0
        )
    return NBitsWeight(
        B=np.concatenate([p.B for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts], axis=0),
        zero_points=zp,
        K=first.K,
        N=sum(p.N for p in parts),
        bits=first.bits,
        block_size=first.block_size,
        perm=first.perm,
        offsets=offsets,
    )


def _float_zeros(w: NBitsWeight) -> np.ndarray:
    if w.zero_points is None:
        return np.full((w.N, w.n_blocks), float(1 << (w.bits - 1)), np.float32)
    if w.zero_points.dtype == np.uint8:
        return unpack_low_first(w.zero_points, w.bits, w.n_blocks).astype(np.float32)
    return np.asarray(w.zero_points, np.float32)


# ---------------------------------------------------------------------------------------------------------
# Grid-exact packing: weights that already lie on a 4-bit block grid (a dequantized Q4_0 / Q4_1 / Q4_K GGUF)

GRID_BLOCK = 32  # every 4-bit GGUF type (Q4_0, Q4_1, Q4_K sub-blocks) has its own scale per 32 weights along K
GRID_TOL = 1e-4  # largest error accepted, in grid steps: float32 rounding of d*q + m is ~1e-6 step


def find_block_grid(w: np.ndarray, bits: int = 4, block_size: int = GRID_BLOCK) -> NBitsWeight | None:
    """W [N, K] as an exact MatMulNBits weight when every block of `block_size` along K lies on an affine
    grid `w = s * (q - z)` with integer codes q in [0, 2^bits) (per block: step s, real offset z), else None.

    Covers llama.cpp's Q4_0 (z = 8), Q4_1 (z = -min/d) and Q4_K (a scale and min per 32-weight sub-block)
    without knowing which made W: a block's grid step is the smallest gap between its distinct values (any
    step that divides all gaps reproduces the block), its codes are the values' offsets from the block's
    minimum in steps. MatMulNBits' zero points are integers (uint8) in its fast kernels; its float zero-point
    form runs ~10x slower on ORT 1.32's CPU kernels (measured). So z is split into the integer zero point
    round(z) and the per-block remainder `offsets = s * (round(z) - z)`, which the graph adds as
    `sum(x over the block) * offset` (a [K/32]-deep float matmul). Dequantized, `s * (q - round(z)) + offset`
    equals W to float32 rounding. Written by hand: no library detects an existing quantization grid."""
    _check_bits(bits)
    _check_block(block_size)
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % block_size:
        return None
    qmax = (1 << bits) - 1
    blocks = w.reshape(n, k // block_size, block_size).astype(np.float64)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    span = hi - lo
    gaps = np.diff(np.sort(blocks, axis=-1), axis=-1)
    gaps = np.where(gaps > span[..., None] / (4 * qmax), gaps, np.inf)  # repeats of one code are exact ties
    step = np.where(span > 0, gaps.min(axis=-1), 1.0)
    levels = np.round(span / step)  # codes used, counted from the block minimum: 0 .. levels
    if levels.max() > qmax:
        return None
    step = np.where(levels > 0, span / np.maximum(levels, 1), np.maximum(np.abs(lo), 1e-30))  # from the extremes
    codes = np.round((blocks - lo[..., None]) / step[..., None])
    err = np.abs(codes * step[..., None] + lo[..., None] - blocks).max(axis=-1)
    if np.any(err > GRID_TOL * step):
        return None
    # w = step * (code + shift - z) with z = shift - lo / step; choose the shift that keeps codes in range and
    # brings z nearest to an integer zero point in range
    z_real = -lo / step
    shift = np.clip(np.round(z_real), 0, qmax - levels)
    z_real = z_real + shift
    z_int = np.clip(np.round(z_real), 0, qmax)
    offsets = (step * (z_int - z_real)).astype(np.float32)
    if np.all(np.abs(z_int - z_real) <= GRID_TOL):
        offsets = None
    return NBitsWeight(
        B=pack_low_first((codes + shift[..., None]).astype(np.uint8), bits),
        scales=step.astype(np.float32),
        zero_points=pack_low_first(z_int.astype(np.uint8), bits),
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
        offsets=offsets,
    )
