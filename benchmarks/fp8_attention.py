"""SDXL's self-attention one shape at a time: bf16 (torch's SDPA) against fp8 through cuDNN's graph API.

Why: with the linears and convolutions in fp8 the MLPerf batch runs at 1.95 images/s (run 53), 2.6 % short of 2.0,
and self-attention (~12 TFLOP a base UNet call at batch 16) is the largest block of bf16 work left. torch's SDPA
has no fp8 kernel; cuDNN has one on Hopper (`sdpa_fp8`). Before an engine lever: is it faster on SDXL's shapes
(head dimension 64, 4096 or 1024 tokens), what do the casts around it cost, how far is its output from bf16's?

Measured (run 54, H200, cuDNN 9.19): no. Per base UNet call at batch 16, bf16 (cuDNN's kernel through torch)
28.2 ms, the fp8 kernel alone 38.4 ms (1.1x faster at 4096 tokens, 1.85x slower at 1024), 69.9 ms with the casts;
its output 1e-1 from bf16's. So the engine has no fp8 attention; this file keeps the whole experiment (the
module, the op, its fp32 reference) to run again on another cuDNN or card.

Per shape, on the same Q, K, V (bf16, views of one fused-projection output, as the UNet has them):
- bf16: `F.scaled_dot_product_attention` on the strided views, with the cuDNN and flash backends;
- fp8 kernel: the op `imagesmith_bench::fp8_sdpa` alone on e4m3 operands (its plan chosen on the first call);
- fp8 whole: `Fp8SelfAttention` compiled (Q, K and V cast to e4m3 with static scales, the op, the output cast back
  to bf16): what a UNet call would pay, at most (in a UNet the last cast could fuse into the next layer's
  quantization);
- fidelity: relative L2 of each fp8 output (back in bf16) against bf16's, and of the kernel against its fp32
  reference arithmetic on the same e4m3 operands (`reference_fp8_sdpa`; batch 2 only: it holds the whole score
  matrix).

How the fp8 attention works: Q, K and V each get a static e4m3 scale, calibrated like the engine's fp8 layers
(`Fp8ActivationScale`, an `Fp8Layer`); the kernel's softmax probabilities are e4m3 at scale 448 (they lie in
[0, 1] before normalising); its output, on Hopper, is e4m3 (bf16 output needs Blackwell) at V's scale, since every
output row is a convex combination of V's rows. The cuDNN graph per shape and its plan come from the engine's
`CudnnGraphs` (engine/cudnn_graphs.py), as the fp8 convolutions' do.

    PYTHONPATH=src:benchmarks python3 benchmarks/fp8_attention.py --batches 16,2 --out results.json
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from fp8_gemm import cudnn_report, print_per_call_totals, record_batch, time_ms, unet_batch_parser
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagesmith.engine.cudnn_graphs import CudnnGraphs, plan_reports, shared
from imagesmith.engine.fp8 import E4M3_MAX, Fp8Layer, calibrate_static_scales, to_e4m3

# The scales' order in the op's one fp32 tensor: descale Q, K, V and S (the probabilities), scale S and O.
_DESCALE_Q, _DESCALE_K, _DESCALE_V, _DESCALE_S, _SCALE_S, _SCALE_O = range(6)
PROBABILITY_SCALE = E4M3_MAX  # softmax's unnormalised probabilities lie in [0, 1]: 1 maps to e4m3's largest


class Fp8ActivationScale(Fp8Layer):
    """A static e4m3 scale for one activation (Q, K or V of one attention), calibrated with the fp8 layers'."""

    def __init__(self) -> None:
        super().__init__("static")
        # Nothing to quantize of its own; a buffer only so calibration knows the device (Fp8Layer.device).
        self.anchor: torch.Tensor
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x's scale, [1, 1] fp32: the calibrated one, or per tensor (this call's) before calibration."""
        return self._input_scale(x)

    def extra_repr(self) -> str:
        return self._scaling_repr()


class Fp8SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V for Q, K, V as [batch, tokens, heads x dim] in bf16, computed in e4m3."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_scale, self.k_scale, self.v_scale = (
            Fp8ActivationScale(),
            Fp8ActivationScale(),
            Fp8ActivationScale(),
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, tokens, inner = q.shape
        shape = (batch, tokens, self.heads, inner // self.heads)
        scales = [self.q_scale(q), self.k_scale(k), self.v_scale(v)]
        # Contiguous [B, N, H, D]: cuDNN reads it as [B, H, N, D] through strides.
        q8, k8, v8 = (
            to_e4m3(x, s).reshape(shape).contiguous() for x, s in zip((q, k, v), scales, strict=True)
        )
        v_scale = scales[2].reshape(1)
        factors = torch.cat(
            [s.reshape(1) for s in scales]
            + [v_scale.new_tensor([1 / PROBABILITY_SCALE, PROBABILITY_SCALE]), 1 / v_scale]
        )
        out = torch.ops.imagesmith_bench.fp8_sdpa(q8, k8, v8, factors)
        return (out.float() * v_scale).to(q.dtype).reshape(batch, tokens, inner)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


@dataclass(frozen=True)
class _Attention:
    """One call's operands: Q [B, Nq, H, D], K and V [B, Nk, H, D], e4m3; the six scale factors in fp32."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    factors: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def shape_key(self) -> tuple[object, ...]:
        return ("sdpa_fp8", tuple(self.q.shape), tuple(self.k.shape))

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def family_key(self) -> tuple[object, ...]:
        return ("sdpa_fp8", tuple(self.q.shape[1:]), tuple(self.k.shape[1:]))

    def new_output(self) -> torch.Tensor:
        return torch.empty(self.q.shape, device=self.q.device, dtype=torch.float8_e4m3fn)


def _bhsd(graph: Any, name: str, x: torch.Tensor, dtype: Any) -> Any:
    """x [B, N, H, D] (contiguous) as cuDNN's [B, H, N, D] with the strides that say so: no copy."""
    b, n, h, d = x.shape
    return graph.tensor(name=name, dim=[b, h, n, d], stride=[n * h * d, d, h * d, 1], data_type=dtype)


class _CudnnFp8Attention(CudnnGraphs):
    """cuDNN graphs for fp8 scaled dot-product attention (inference, no mask), e4m3 in and out."""

    kind = "fp8 attention"

    def describe(self, cudnn: Any, handle: Any, call: _Attention) -> tuple[Any, dict[str, Any]]:
        dt = cudnn.data_type
        graph = cudnn.pygraph(
            io_data_type=dt.FP8_E4M3,
            intermediate_data_type=dt.FLOAT,
            compute_data_type=dt.FLOAT,
            handle=handle,
        )
        tensors = {
            name: _bhsd(graph, name, x, dt.FP8_E4M3)
            for name, x in zip("qkv", (call.q, call.k, call.v), strict=True)
        }
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
        out, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"],
            k=tensors["k"],
            v=tensors["v"],
            descale_q=tensors["descale_q"],
            descale_k=tensors["descale_k"],
            descale_v=tensors["descale_v"],
            descale_s=tensors["descale_s"],
            scale_s=tensors["scale_s"],
            scale_o=tensors["scale_o"],
            is_inference=True,
            attn_scale=1 / math.sqrt(call.q.shape[-1]),
            name="sdpa_fp8",
        )
        b, n, h, d = call.q.shape
        out.set_output(True).set_dim([b, h, n, d]).set_stride([n * h * d, d, h * d, 1]).set_data_type(
            dt.FP8_E4M3
        )
        for amax in (amax_s, amax_o):  # the kernel computes them; nothing here reads them
            amax.set_output(False).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        tensors["output"] = out
        return graph, tensors

    def pack(self, tensors: dict[str, Any], call: _Attention, out: torch.Tensor) -> dict[Any, torch.Tensor]:
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        pack = {tensors[name]: call.factors[i : i + 1].reshape(1, 1, 1, 1) for i, name in enumerate(names)}
        pack.update(
            {tensors["q"]: call.q, tensors["k"]: call.k, tensors["v"]: call.v, tensors["output"]: out}
        )
        return pack


_CUDNN = shared(_CudnnFp8Attention())


def reference_fp8_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """The kernel's arithmetic in fp32: the operands descaled, softmax's unnormalised probabilities rounded to e4m3
    at PROBABILITY_SCALE (what the kernel feeds its second matmul), normalised after, the output in e4m3."""
    f = factors.float()
    qf = q.float().transpose(1, 2) * f[_DESCALE_Q]  # [B, H, N, D]
    kf = k.float().transpose(1, 2) * f[_DESCALE_K]
    vf = v.float().transpose(1, 2) * f[_DESCALE_V]
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    unnormalised = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # in (0, 1]
    rounded = to_e4m3(unnormalised, 1 / f[_SCALE_S]).float() * f[_DESCALE_S]
    out = (rounded @ vf) / unnormalised.sum(dim=-1, keepdim=True)
    return to_e4m3(out.transpose(1, 2), 1 / f[_SCALE_O]).contiguous()


@torch.library.custom_op("imagesmith_bench::fp8_sdpa", mutates_args=())
def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V for e4m3 Q [B, N, H, D], K and V [B, M, H, D] with `factors` (fp32: descale Q, K,
    V, S; scale S, O); the output [B, N, H, D] in e4m3 at scale O."""
    if q.is_cuda:
        return _CUDNN.run(_Attention(q, k, v, factors))
    return reference_fp8_sdpa(q, k, v, factors)


@fp8_sdpa.register_fake
def _fp8_sdpa_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


# (tokens, heads, head dim, self-attentions per base UNet call) at 1024x1024: the 640-channel blocks have 2
# transformer layers in each of 2 down and 3 up attentions, the 1280-channel ones 10 in each of 2 down, 1 mid and
# 3 up (benchmarks/sdxl-architecture.json).
BASE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((4096, 10, 64, 10), (1024, 20, 64, 60))
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def measure_shape(batch: int, tokens: int, heads: int, dim: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(tokens + heads)
    inner = heads * dim
    # Peakier than N(0, 1) scores, as trained attention is: Q and K at twice unit scale.
    qkv = torch.randn(batch, tokens, 3 * inner, device="cuda", dtype=torch.bfloat16)
    qkv[..., : 2 * inner] *= 2
    q, k, v = qkv.chunk(3, dim=-1)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, tokens, heads, dim).transpose(1, 2)

    row: dict[str, Any] = {}
    expected = None
    for name, backend in BACKENDS.items():
        with sdpa_kernel([backend]):

            def bf16() -> torch.Tensor:
                return F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))

            row[f"bf16 {name}"] = time_ms(bf16, repeats)
            if expected is None and row[f"bf16 {name}"] == row[f"bf16 {name}"]:  # not NaN: it ran
                expected = bf16().transpose(1, 2).reshape(batch, tokens, inner)
    assert expected is not None, "no bf16 backend ran"

    attention = Fp8SelfAttention(heads).cuda()
    reports_before = len(plan_reports())
    with torch.no_grad():
        calibrate_static_scales(
            [attention.q_scale, attention.k_scale, attention.v_scale], lambda: attention(q, k, v)
        )
        eager = attention(q, k, v)  # the calibration's call chose the shape's plan
        row["plan"] = plan_reports()[reports_before:]
        compiled = torch.compile(attention, fullgraph=True)
        row["fp8 whole"] = time_ms(lambda: compiled(q, k, v), repeats)
        whole = compiled(q, k, v)
        scales: list[torch.Tensor] = []
        for layer in (attention.q_scale, attention.k_scale, attention.v_scale):
            assert layer.input_scale is not None, "calibration reached every scale"
            scales.append(layer.input_scale)
        q8, k8, v8 = (
            (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(batch, tokens, heads, dim)
            for x, s in zip((q, k, v), scales, strict=True)
        )
        v_scale = scales[2].reshape(1)
        factors = torch.cat(
            [s.reshape(1) for s in scales] + [v_scale.new_tensor([1 / 448, 448]), 1 / v_scale]
        )
        row["fp8 kernel"] = time_ms(lambda: torch.ops.imagesmith_bench.fp8_sdpa(q8, k8, v8, factors), repeats)
        row["rel L2 vs bf16 (eager)"] = relative_l2(eager, expected)
        row["rel L2 vs bf16 (compiled)"] = relative_l2(whole, expected)
        if batch <= 2:
            kernel = torch.ops.imagesmith_bench.fp8_sdpa(q8, k8, v8, factors)
            reference = reference_fp8_sdpa(q8, k8, v8, factors)
            row["rel L2 kernel vs its reference"] = relative_l2(kernel.float(), reference.float())
    row["tflop"] = 4 * batch * heads * tokens * tokens * dim / 1e12
    return row


def main(argv: list[str] | None = None) -> int:
    parser = unet_batch_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    import cudnn  # nvidia-cudnn-frontend, after torch has loaded libcudnn

    report = cudnn_report(cudnn)
    methods = [f"bf16 {name}" for name in BACKENDS] + ["fp8 kernel", "fp8 whole"]
    for batch in (int(b) for b in args.batches.split(",")):
        rows = {}
        for tokens, heads, dim, count in BASE_SHAPES:
            label = f"{tokens} tokens x {heads} heads x {dim}"
            try:
                row = measure_shape(batch, tokens, heads, dim, args.repeats)
            except Exception as error:  # report and go on: the other shapes still say something
                print(f"batch {batch:2d} {label}: failed: {type(error).__name__}: {error}", flush=True)
                continue
            row["count"] = count
            rows[label] = row
            best_bf16 = min(row[f"bf16 {name}"] for name in BACKENDS)
            print(
                f"batch {batch:2d} {label:28s} x{count:2d} "
                + " | ".join(f"{m} {row[m]:.3f}" for m in methods)
                + f" | {row['tflop'] / best_bf16 * 1e3:.0f} -> {row['tflop'] / row['fp8 kernel'] * 1e3:.0f} TFLOP/s"
                + f" | rel L2 {row['rel L2 vs bf16 (compiled)']:.1e}"
                + f" (kernel vs reference {row.get('rel L2 kernel vs its reference', float('nan')):.1e})"
                + f" | plan {[(p['name'], p['seconds']) for p in row['plan']]}",
                flush=True,
            )
        record_batch(report, batch, rows, methods, args.out)
    print_per_call_totals(report, "ms per base UNet call, summed over its self-attentions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
