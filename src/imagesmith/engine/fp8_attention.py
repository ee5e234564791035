"""fp8 self-attention for the UNets (opt-in, lossy, on top of fp8 linears with static scales): IMAGESMITH_FP8_ATTENTION.

Why: with the linears and convolutions in fp8, the MLPerf batch runs at 1.95 images/s (run 53), and the largest
bf16 work left in a base UNet call is its self-attention: ~12 TFLOP a call at batch 16 (70 transformer layers,
4096 or 1024 tokens, head dimension 64), ~31 ms of ~190. torch's scaled_dot_product_attention has no fp8 kernel;
cuDNN has one on Hopper (`sdpa_fp8` in its graph API, reached like engine/fp8_conv.py's convolutions through
NVIDIA's cuDNN frontend).

How:
- Only self-attention: cross-attention reads 77 text tokens, ~1 % of the attention FLOPs.
- Q, K and V come out of the fused QKV projection in bf16 and are cast to e4m3, each with its own static scale
  calibrated at start-up with the fp8 linears' (three `Fp8ActivationScale` layers per attention; the cast is a
  multiply and a cast that inductor fuses into one kernel over the projection's output).
- The kernel's softmax probabilities are e4m3 too, scaled by 448 (they lie in [0, 1] before normalising), and
  its output, on Hopper, is e4m3 (bf16 output needs Blackwell): every output row is a convex combination of V's
  rows, so V's scale fits it, and no calibration is needed for it.
- The attention itself is one custom op, `imagesmith::fp8_sdpa`, opaque to torch.compile: on a CUDA GPU a cuDNN
  graph per shape (engine/cudnn_graphs.py: plans timed on the first call, the fastest remembered); off the GPU
  the same arithmetic in fp32 with the probabilities rounded to e4m3 as the kernel does (tests, not speed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagesmith.engine.cudnn_graphs import CudnnGraphs, shared
from imagesmith.engine.fp8 import E4M3_MAX, Fp8Layer, to_e4m3

log = logging.getLogger(__name__)

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
        out = torch.ops.imagesmith.fp8_sdpa(q8, k8, v8, factors)
        return (out.float() * v_scale).to(q.dtype).reshape(batch, tokens, inner)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class Fp8AttnProcessor:
    """diffusers' fused-projection processor with the self-attention in fp8 (Fp8SelfAttention, as the attention's
    `fp8_sdpa` submodule); cross-attention goes to the processor it replaced."""

    def __init__(self, replaced: Any) -> None:
        self.replaced = replaced

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.replaced(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        out = attn.to_out[1](attn.to_out[0](attn.fp8_sdpa(q, k, v)))
        return out / attn.rescale_output_factor


def _eligible(attn: Any) -> bool:
    """A plain self-attention with fused projections, as every SDXL transformer block's first attention is."""
    return (
        not attn.is_cross_attention
        and getattr(attn, "fused_projections", False)
        and hasattr(attn, "to_qkv")
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and (attn.inner_dim // attn.heads) % 16 == 0
        and attn.inner_dim // attn.heads <= 256
    )


def quantize_self_attention(unet: nn.Module) -> int:
    """Give each eligible self-attention an Fp8SelfAttention and the processor that uses it; returns how many.
    Needs the fused QKV projections (fuse_qkv_projections first)."""
    from diffusers.models.attention_processor import Attention

    converted = 0
    for module in unet.modules():
        if isinstance(module, Attention) and _eligible(module):
            module.fp8_sdpa = Fp8SelfAttention(module.heads).to(next(module.parameters()).device)
            module.set_processor(Fp8AttnProcessor(module.processor))  # type: ignore[arg-type]
            converted += 1
    return converted


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


@torch.library.custom_op("imagesmith::fp8_sdpa", mutates_args=())
def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V for e4m3 Q [B, N, H, D], K and V [B, M, H, D] with `factors` (fp32: descale Q, K,
    V, S; scale S, O); the output [B, N, H, D] in e4m3 at scale O."""
    if q.is_cuda:
        return _CUDNN.run(_Attention(q, k, v, factors))
    return reference_fp8_sdpa(q, k, v, factors)


@fp8_sdpa.register_fake
def _fp8_sdpa_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)
