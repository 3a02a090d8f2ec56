# Gated linear unit: h = [a | gate] along the last dim (2F) -> a * act(gate), act = exact GELU
# (erf; SD's GEGLU) or SiLU (MobileDiffusion's SwiGLU), math in fp32.
#
# Elementwise over a (rows, F) grid of 2-D tiles: reads 2F and writes F elements per row, once
# each — the minimum; torch's chunk + gelu + mul would write and re-read two (rows, F) temporaries.
from __future__ import annotations

import triton
import triton.language as tl

from .common import new_output

_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # jit code may only read constexpr globals


@triton.jit
def _glu_kernel(h_ptr, out_ptr, num_rows, features, stride_h_row,
                BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr, GELU: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < features)
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h_row
    a = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_row + features + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * _INV_SQRT2))
    else:
        act = gate * tl.sigmoid(gate)
    out = out_ptr + rows.to(tl.int64)[:, None] * features + cols[None, :]
    tl.store(out, (a * act).to(out_ptr.dtype.element_ty), mask=mask)


def glu(h, *, activation="gelu"):
    features = h.shape[-1] // 2
    rows_view = h.reshape(-1, h.shape[-1])  # a view whenever the leading dims are uniformly strided
    if rows_view.stride(-1) != 1:
        rows_view = rows_view.contiguous()
    num_rows = rows_view.shape[0]
    out = new_output((*h.shape[:-1], features), like=h)
    if num_rows == 0:
        return out

    block_f = min(1024, triton.next_power_of_2(features))
    block_rows = max(1, min(triton.next_power_of_2(num_rows), 4096 // block_f))
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(features, block_f))
    _glu_kernel[grid](rows_view, out, num_rows, features, rows_view.stride(0),
                      BLOCK_ROWS=block_rows, BLOCK_F=block_f, GELU=activation == "gelu", num_warps=4)
    return out
