"""The nodes of an exported SDXL UNet graph that depend on its weights alone: per-call work that could be done
once (what inductor's `freezing` folds into constants).

Why: run 89 found inductor's static graphs copying every NCHW convolution weight on every call. Such copies come
from lowering; this looks one level up, at the aten graph a compile starts from, for work of the same kind
(weight transposes, concatenations, casts). It builds the full-size UNet on the meta device, so it needs no GPU,
no weights and seconds of CPU, and sets it up as the engine does (bf16, QKV fused, channels-last weights).

    python3 benchmarks/weight_only_nodes.py [--unet base|refiner] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from sdxl_random import UNET_KEY, architecture


def weight_only_nodes(exported: Any) -> dict[str, int]:
    """Per aten operator, how many nodes of `exported` (a torch.export.ExportedProgram) take only parameters,
    buffers, constants or other such nodes as inputs (factories such as `arange` included), and so compute the
    same values on every call."""
    signature = exported.graph_signature
    constants = {
        *signature.inputs_to_parameters,
        *signature.inputs_to_buffers,
        *signature.inputs_to_lifted_tensor_constants,
    }
    fixed: set[Any] = set()
    counts: collections.Counter[str] = collections.Counter()
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            if node.name in constants:
                fixed.add(node)
        elif node.op == "call_function" and all(source in fixed for source in node.all_input_nodes):
            fixed.add(node)
            counts[str(node.target)] += 1
    return dict(counts.most_common())


def export_unet(which: str, size: str) -> Any:
    """The SDXL UNet `which` exported on the meta device, set up as the engine holds it, for one guided call
    (two rows) at 1024x1024 (`size` full) or the smoke architecture's toy size."""
    from diffusers import UNet2DConditionModel

    config = architecture(size)[which][UNET_KEY]
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**config)
    unet.to(torch.bfloat16)
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last).eval()
    latent = 128 if size == "full" else 8
    # The class embedding takes the pooled text embedding and each time id's sinusoidal embedding, side by side.
    pooled = 1280 if size == "full" else 32
    n_ids = (config["projection_class_embeddings_input_dim"] - pooled) // config["addition_time_embed_dim"]

    def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    args = (
        meta(2, 4, latent, latent),
        meta(2, dtype=torch.float32),
        meta(2, 77, config["cross_attention_dim"]),
    )
    conditions = {"text_embeds": meta(2, pooled), "time_ids": meta(2, n_ids)}
    with torch.no_grad():
        return torch.export.export(unet, args, {"added_cond_kwargs": conditions}, strict=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--unet", default="base", choices=("base", "refiner"))
    parser.add_argument("--smoke", action="store_true", help="the toy architecture (the same structure)")
    args = parser.parse_args(argv)
    exported = export_unet(args.unet, "smoke" if args.smoke else "full")
    found = weight_only_nodes(exported)
    total = sum(1 for node in exported.graph.nodes if node.op == "call_function")
    print(f"{args.unet} UNet: {total} aten nodes, {sum(found.values())} depend on the weights alone: {found}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
