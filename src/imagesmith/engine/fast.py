"""Speed levers, each switchable in settings and measured in docs/benchmarks.md.

Applied once after loading, before warm-up. Exact levers change no result beyond bf16 rounding (fused QKV does
the same products in one matrix; compile fuses elementwise work; channels_last only changes memory layout).
fp8 (engine/fp8.py) is lossy and opt-in, its fidelity figure reported in the benchmarks. Measured on an H200
(docs/benchmarks.md, runs 6-10): compile `reduce-overhead` is the fastest exact mode at batch 1 (1.33 s for the
40-step ensemble, 1.91x diffusers' fp16 peer); fp8 with static scales is faster still and 3.3 GiB smaller, but
lossy (1.21 s at PSNR 43.9 dB, run 46; Engine.start calibrates the scales, engine/fp8_calibration.py). With the
CUDA-graph modes the text encoders are replayed as CUDA graphs too (engine/encoder_graphs.py: exact, 1.455 ->
1.381 s, run 42).

Compilation happens at start-up (warm-up), never on a request: `warm_up` runs one small generation per shape
so that the first user does not pay the minutes, and after it the service calls `stop_compiling_on_requests`:
a shape no warmed-up graph serves runs uncompiled (IMAGESMITH_COMPILE_ON_REQUEST=true compiles it once instead).
The inductor cache lives in the data dir, so a restart reuses compiled kernels instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from imagesmith.config import CUDA_GRAPH_MODES, CompileChoice, Settings
from imagesmith.engine import bf16_geglu, empty_negative, encoder_graphs, fa4_attention
from imagesmith.engine.batch_routing import BatchRoutedCall
from imagesmith.engine.compile_regions import compile_transformer_blocks_once, regions_supported
from imagesmith.engine.cudnn_graphs import remember_plans_in
from imagesmith.engine.decoder_attention import route_decoder_attention
from imagesmith.engine.fp8 import quantize_transformer_linears
from imagesmith.engine.fp8_conv import quantize_convolutions
from imagesmith.engine.fp8_geglu import fuse_geglu_feed_forwards
from imagesmith.engine.hardware import HardwarePlan
from imagesmith.engine.models import unets_of
from imagesmith.engine.multi_kernel_cache import restore_locks_of_cached_kernels
from imagesmith.engine.progress import DECODE_STAGE, CancelToken, GenerationCanceled, ProgressEvent
from imagesmith.engine.size_routing import SizeRoutedCall, latent_size_of_image
from imagesmith.preview import PreviewCopy
from imagesmith.schemas import MAX_SIDE, MIN_SIDE

log = logging.getLogger(__name__)


def use_persistent_compile_cache(cache: Path) -> Path:
    """Point inductor's caches at a lasting folder and switch them on.

    Assigned, not setdefault: torch fills TORCHINDUCTOR_CACHE_DIR with a /tmp default the first time it looks,
    which may already have happened. IMAGESMITH_COMPILE_CACHE_DIR chooses another place.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def quiet_known_compile_warnings() -> None:
    """Silence the one warning every compiled start printed (a dozen lines on stderr, run 114's log): Dynamo
    traces through diffusers' lru_cache'd `is_torch_version` in the upsamplers' bf16 branch. Harmless: the
    function answers a constant about the installed torch, so tracing it gives what the cache would."""
    warnings.filterwarnings(
        "ignore",
        message=r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function",
        category=UserWarning,
    )


def compile_cache_for(settings: Settings, plan: HardwarePlan) -> Path:
    """One inductor cache per attention choice. The traced graph holds one scaled_dot_product_attention call
    whichever kernel runs it, and inductor's AOTAutograd cache keys on that graph: a shared cache handed a
    restart with another IMAGESMITH_ATTENTION_BACKEND the kernels compiled for the old one (seen in run 20)."""
    return compile_cache_root(settings) / f"attention-{plan.attention}"


def compile_cache_root(settings: Settings) -> Path:
    return settings.compile_cache_dir or settings.data_dir / "compile-cache"


def _drop_unfused_projections(model: Any) -> int:
    """diffusers keeps to_q/to_k/to_v beside the fused copies (to undo the fusion): 1.8 GiB for SDXL, measured.
    The fused processor reads to_qkv for self-attention and to_q + to_kv for cross-attention; drop the rest."""
    from diffusers.models.attention_processor import Attention

    dropped = 0
    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_projections", False):
            names = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            for name in names:
                if hasattr(module, name):
                    delattr(module, name)
                    dropped += 1
    return dropped


def decoder_math_attention_wanted(settings: Settings, plan: HardwarePlan) -> bool:
    """The VAE decoder's attention as matmuls where it pays (engine/decoder_attention.py): on unless turned
    off, only with the decoder compiled, and only for a plan that decodes in bf16 (where it was measured; an fp16
    or fp32 decode would take the kernel anyway, and health would name a lever not in force). The size bound,
    and the fp32 retry of a NaN decode, are decided inside the traced code, so the decoder keeps dynamo's usual
    graphs: a few, whatever the sizes served, not one per size."""
    compiled = settings.compile is not CompileChoice.OFF
    return compiled and bool(settings.decoder_math_attention) and plan.vae_dtype is torch.bfloat16


def fuse_qkv_wanted(settings: Settings, plan: HardwarePlan) -> bool:
    """Fusing pays only when compiled (eager: 2.47 vs 2.48 s on an H200) and must happen on resident weights
    (offloaded weights are on the meta device, and the new fused layers would get no offload hook)."""
    wanted = settings.fuse_qkv if settings.fuse_qkv is not None else settings.compile is not CompileChoice.OFF
    return wanted and plan.offload == "none"


def channels_last_wanted(settings: Settings, plan: HardwarePlan) -> bool:
    """Unless set: on with compile applied (offload none). Two kinds of compiled graph gain:
    - static graphs: inductor lays them out channels-last itself, but its convolution lowering (kernel/conv.py,
      `require_channels_last(weight)`) copies each NCHW weight into that layout on every call, 1.3 GB a base call
      and 3.1 GB a refiner call, which channels-last weights skip: an ensemble image 1.357 -> 1.328 s, its base
      calls -0.40 ms, its refiner calls -1.01 ms (run 89, an H100);
    - the graphs shared by sizes outside the warm-up (symbolic sides): inductor leaves those NCHW
      (`decide_layout_opt`), so cuDNN transposed around each convolution (2.9 ms a base call, run 87); with
      channels-last weights each convolution's output is channels-last by eager's rule, which the graph keeps: +8.8
      ms a call against the static graph where NCHW ran +10.3, and a compile of 318 s against 453 s (runs 87-88).
    What loses is a size that runs uncompiled (a server's sizes outside its warm-up): an eager base call takes 68.9
    against 58.2 ms (run 90), but a whole 1024x960 request in the service only 2.42 against 2.39 s, where the
    warmed 1024x1024 took 1.39 against 1.42 s (run 90, one H100). Eager without compile keeps NCHW."""
    if settings.channels_last is not None:
        return settings.channels_last
    return settings.compile is not CompileChoice.OFF and plan.offload == "none"


def cudnn_benchmark_wanted(settings: Settings, plan: HardwarePlan) -> bool:
    """Worth it where shapes repeat (a server's fixed sizes): the timing runs once per shape. Measured with
    compile only (1-2 %, runs 12-13, most of it in the VAE decode), so it follows compile unless set; but
    not with CUDA graphs: cuDNN's timing runs kernels and synchronises, which a graph capture forbids, so a
    convolution whose timing is not cached when a graph is recorded fails the capture ("FIND was unable to
    find an engine", run 27) and leaves the thread's CUDA-graph state broken; settings refuse that pair."""
    if settings.cudnn_benchmark is not None:
        wanted = settings.cudnn_benchmark
    else:
        wanted = settings.compile is not CompileChoice.OFF and settings.compile not in CUDA_GRAPH_MODES
    return wanted and plan.device.startswith("cuda")


def text_encoder_graphs_wanted(settings: Settings, plan: HardwarePlan) -> bool:
    """Exact and cheap (engine/encoder_graphs.py), so on by default where the user already chose CUDA graphs
    for the UNets; a graph keeps the weights' addresses, so never with offload."""
    if not plan.device.startswith("cuda") or plan.offload != "none":
        return False
    if settings.text_encoder_graphs is not None:
        return settings.text_encoder_graphs
    return settings.compile in CUDA_GRAPH_MODES


def _route_fa4_attention(unets: list[Any], plan: HardwarePlan, settings: Settings) -> str:
    """FA4 only ever runs because a user asked for it, so a GPU where its kernel fails refuses to start, saying
    why, rather than start with another kernel than the one asked for."""
    fa4_attention.keep_kernels_in(compile_cache_for(settings, plan) / "fa4-kernels")
    problem = fa4_attention.start_problem(plan.device)
    if problem is not None:
        raise RuntimeError(f"{fa4_attention.SETTING}=fa4, but {problem}")
    routed = sum(fa4_attention.route_unet_attention(unet) for unet in unets)
    return f"attention: the UNets' x{routed} through FlashAttention-4"


def apply_speed_levers(base: Any, refiner: Any | None, plan: HardwarePlan, settings: Settings) -> list[str]:
    """Apply the levers the settings ask for; return what was applied, for the start-up log and health."""
    if settings.fp8 and not plan.fp8_asked:
        # A plan made from other settings would silently leave the weights in bf16 (a benchmark did once).
        raise ValueError(
            "settings ask for fp8 but the hardware plan was made without it: plan with these settings"
        )
    applied: list[str] = []
    unets = unets_of(base, refiner)
    if fuse_qkv_wanted(settings, plan):
        base.fuse_qkv_projections(unet=True, vae=True)
        if refiner is not None:
            refiner.fuse_qkv_projections(unet=True, vae=False)  # the VAE is the base's, already fused
        for model in [*unets, base.vae]:
            _drop_unfused_projections(model)
            # The fused projections are new layers, made requiring grad: frozen like the loaded weights
            # (models.py's _freeze_for_inference says why), so the compile cache's key does not depend on them.
            model.requires_grad_(False)
        applied.append("fused QKV")
    elif settings.fuse_qkv and plan.offload != "none":
        log.warning("fuse_qkv skipped: it needs offload=none (plan: %s)", plan.offload)
    if channels_last_wanted(settings, plan):
        for unet in unets:
            unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if plan.device.startswith("cuda"):
        # Process-wide (the service runs one engine), so set either way: an earlier engine's choice (a test's,
        # a benchmark's) must not carry over into CUDA-graph captures.
        torch.backends.cudnn.benchmark = cudnn_benchmark_wanted(settings, plan)
        if torch.backends.cudnn.benchmark:
            applied.append("cudnn.benchmark")
    if plan.attention == "fa4":  # the UNets' blocks get FA4's processor, after the QKV fusion it stands for
        applied.append(_route_fa4_attention(unets, plan, settings))
    elif plan.attention != "auto":  # entered around each generation by the engine (engine/attention.py)
        applied.append(f"attention: {plan.attention} first")
    if settings.empty_negative_shortcut and plan.offload == "sequential":
        # Sequential offload puts each layer's weights back on the meta device after its forward: the bias
        # the skipped rows are given would not be there to read.
        log.warning("empty_negative_shortcut skipped: it needs offload none or model (plan: sequential)")
    elif settings.empty_negative_shortcut:  # wraps the processors above (FA4's too); before any compile
        empty_negative.install(base.unet)
        wrapped = len(empty_negative.cross_attentions(base.unet))
        applied.append(f"base cross-attentions on the guided rows only without a negative prompt x{wrapped}")
    if text_encoder_graphs_wanted(settings, plan):
        encoders = encoder_graphs.text_encoders(base, refiner)
        for encoder in encoders:
            encoder_graphs.install(encoder)
        applied.append(f"text encoders as CUDA graphs x{len(encoders)}")
    elif settings.text_encoder_graphs:
        log.warning("text_encoder_graphs skipped: it needs a CUDA GPU and offload=none (plan: %s)", plan)
    if plan.fp8 is not None:  # decided, with its reason, by the hardware plan
        converted = sum(quantize_transformer_linears(unet, plan.fp8) for unet in unets)
        # Static scales are calibrated by Engine.start, before anything is compiled.
        applied.append(f"fp8 transformer linears x{converted}, {plan.fp8} scales (lossy)")
    if plan.fp8_fused_geglu:  # the plan allows it only with static fp8 linears, which it then holds
        fused = sum(fuse_geglu_feed_forwards(unet) for unet in unets)
        applied.append(f"fp8 GEGLU fused into the feed-forwards' first matmul x{fused}")
    if plan.fused_geglu:  # the plan allows it only for bf16 weights on a CUDA GPU, without fp8 linears
        fault = bf16_geglu.kernel_fault(plan.device)
        if fault is None:
            fused = sum(bf16_geglu.fuse_bf16_geglu_feed_forwards(unet) for unet in unets)
            applied.append(f"GEGLU fused into the feed-forwards' first bf16 matmul x{fused}")
        elif settings.fused_geglu is None:  # the default: start without it, and say why
            log.warning(
                "bf16 fused GEGLU skipped: its kernel failed its check on %s (%s); the feed-forwards run "
                "unfused. IMAGESMITH_FUSED_GEGLU=false skips the check.",
                plan.device,
                fault,
            )
        else:
            raise RuntimeError(
                f"IMAGESMITH_FUSED_GEGLU=true, but its kernel failed its check on {plan.device} ({fault}): "
                "set IMAGESMITH_FUSED_GEGLU=false, or unset it to start without the kernel where it fails"
            )
    if plan.fp8_convs:  # the plan allows it only with static fp8 linears, calibrated together
        converted = sum(quantize_convolutions(unet) for unet in unets)
        remember_plans_in(compile_cache_root(settings))  # a restart skips choosing them (135 s, run 52)
        # Inductor keeps a graph's activations channels-last only when it sees enough convolutions in it (fewer
        # than one per 300 nodes: off). The custom op hides 49 of the base UNet's 51, so its ~14,000-node graph
        # would run NCHW, with a transpose before every fp8 convolution and every transformer block; run 52
        # measured fp8 convolutions that way. Forced, the graph keeps the layout it had with bf16 convolutions.
        # Process-wide, and harmless elsewhere: a graph with many convolutions (the VAE decoder, bf16 UNets)
        # chooses channels-last anyway, and one without any has no convolution output to lay out.
        import torch._inductor.config as inductor_config  # here: importing inductor takes a while

        inductor_config.force_layout_optimization = True
        applied.append(f"fp8 convolutions x{converted} through cuDNN, static scales, channels-last (lossy)")
    if settings.compile is not CompileChoice.OFF:
        if plan.offload != "none":
            # Offload hooks move weights between devices inside forward; compiled graphs would break there.
            log.warning(
                "compile=%s skipped: it needs offload=none (plan: %s)", settings.compile.value, plan.offload
            )
        else:
            use_persistent_compile_cache(compile_cache_for(settings, plan))
            quiet_known_compile_warnings()
            allow_graphs_per_model(UNET_GRAPHS_ALLOWED)
            timed = use_timed_reductions(timed_reductions_wanted(settings))
            regions = _mark_compile_regions(unets) if settings.compile_regions else ""
            options = unet_compile_options(settings)
            for unet in unets:
                if options["dynamic"] is None:
                    # What Module.compile installs, with a static graph kept for one image's pass
                    # (engine/batch_routing.py says why).
                    unet._compiled_call_impl = BatchRoutedCall(unet._call_impl, options)
                else:
                    unet.compile(**options)
            # The processor goes in before compiling (after the QKV fusion above, whose processor it replaces).
            routed = (
                route_decoder_attention(base.vae.decoder)
                if decoder_math_attention_wanted(settings, plan)
                else 0
            )
            # Not dynamic in the batch: the engine decodes one image at a time at any batch size. Routed by image
            # size: a warmed-up size keeps its static graph (engine/size_routing.py says why).
            route_decoder(base.vae.decoder, {"fullgraph": True, "mode": decoder_compile_mode(settings)})
            dynamic = ", dynamic shapes" if options["dynamic"] else ""
            attention = " (its attention as matmuls up to 1024x1024 in bf16)" if routed else ""
            # One lever: serving eager after a failed compile (serve_eager_from_now) drops the regions, and the
            # decoder's matmul attention, with it.
            applied.append(
                f"torch.compile(mode={settings.compile.value}{dynamic}{regions}{timed}) UNets + VAE decoder"
                f"{attention}"
            )
    else:
        if settings.compile_regions:
            log.warning("compile_regions skipped: it shapes what torch.compile compiles, and compile is off")
        if settings.timed_reductions:  # asked for by name, not the default's None
            log.warning("timed_reductions skipped: it chooses compiled kernels, and compile is off")
    return applied


def timed_reductions_wanted(settings: Settings) -> bool:
    """IMAGESMITH_TIMED_REDUCTIONS as set, else on whenever the engine compiles (the default since session 46)."""
    if settings.timed_reductions is not None:
        return settings.timed_reductions
    return settings.compile is not CompileChoice.OFF


def use_timed_reductions(wanted: bool) -> str:
    """Inductor's multi-kernel on or off for what compiles from now on, and the compile lever's words for it.

    Inductor compiles a reduction held in registers (`persistent`) only up to a fixed width, and loops over wider
    rows. The UNets' 1280-wide layer norms fell on the loop's side: 10-14 us each against ~7 us of bytes (run 91,
    H100). Multi-kernel compiles both forms and keeps the faster on the first call, which the warm-up makes.
    Set both ways, never left as the last engine set it: process-wide, and part of inductor's cache key."""
    import torch._inductor.config as inductor_config  # here: importing inductor takes a while

    inductor_config.triton.multi_kernel = 1 if wanted else 0
    if wanted:
        # Without this, every multi-kernel graph loaded from the compile cache fails (engine/multi_kernel_cache.py).
        restore_locks_of_cached_kernels()
    return ", timed reductions" if wanted else ""


def _mark_compile_regions(unets: list[Any]) -> str:
    """The UNets' transformer blocks compiled once per kind (engine/compile_regions.py), for the compile lever's
    text; a torch without nested compile regions compiles as before, with a warning."""
    if not regions_supported():
        log.warning(
            "compile_regions skipped: this torch (%s) has no nested compile regions", torch.__version__
        )
        return ""
    marked = sum(compile_transformer_blocks_once(unet) for unet in unets)
    return f", {marked} transformer blocks as regions"


def decoder_compile_mode(settings: Settings) -> str | None:
    """The VAE decoder's torch.compile mode: the UNets' without CUDA graphs. A 1024x1024 decode is ~45 ms of
    large kernels, so a graph has little launch time to save. Measured on an H200 (runs 49-50 in
    docs/benchmarks.md), together with engine/decode.py's conversion on the device: the decode 54.8 -> 43.8 ms,
    the 40-step ensemble 1.369 -> 1.350 s, the MLPerf batch of 8 +2.9 %; the cost, 1.3 GiB more peak memory
    (the decoder's activations no longer share the UNets' graph pool). The split between the two changes was
    not measured. cuDNN's algorithm timing around the decode, which a graph would forbid, gained nothing
    (43.8 ms either way, run 50), so it is not used."""
    if settings.compile is CompileChoice.MAX_AUTOTUNE:
        return CompileChoice.MAX_AUTOTUNE_NO_CUDAGRAPHS.value
    if settings.compile is CompileChoice.REDUCE_OVERHEAD:
        return None  # torch.compile's default mode
    return unet_compile_options(settings)["mode"]


# Graphs dynamo may keep per code object: each route of engine/size_routing.py has its own, with about two graphs
# per warmed-up size (guidance and not). Dynamo's default (8) was once shared by the base and the refiner (one UNet
# class, one code object). Past the limit a fullgraph compile raises, and the engine would serve eager from then on.
UNET_GRAPHS_ALLOWED = 64


def allow_graphs_per_model(limit: int) -> None:
    """Raise dynamo's recompile limit to `limit` (never lower it). Named cache_size_limit before torch 2.6."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def unet_compile_options(settings: Settings) -> dict[str, Any]:
    """torch.compile's arguments for the UNets. Without `dynamic` (the default) each UNet gets two graphs,
    a static one for one image's pass and one dynamic in the batch (engine/batch_routing.py): two compiles,
    and the service's batch-8 warm-up was 308 of its 578 s first start (run 27). dynamic=True
    (IMAGESMITH_COMPILE_DYNAMIC) makes every size symbolic in one graph from the first compile, so the batched
    warm-up needs no second one (torch may still guard a few sizes apart: the GPU run has to show which)."""
    return {
        "fullgraph": True,
        "mode": None if settings.compile is CompileChoice.DEFAULT else settings.compile.value,
        "dynamic": True if settings.compile_dynamic else None,
    }


def compiled_modules(engine: Any) -> list[Any]:
    """Every module Module.compile wrapped: the UNets and the VAE decoder."""
    base, refiner = engine.models.base, engine.models.refiner
    modules = [*unets_of(base, refiner), base.vae.decoder]
    return [module for module in modules if getattr(module, "_compiled_call_impl", None) is not None]


def routed_calls(engine: Any) -> list[SizeRoutedCall | BatchRoutedCall]:
    """The compiled calls routed by image size (engine/size_routing.py, engine/batch_routing.py): every compiled
    module's but Module.compile's own (IMAGESMITH_COMPILE_DYNAMIC's UNets)."""
    calls = [module._compiled_call_impl for module in compiled_modules(engine)]
    return [call for call in calls if isinstance(call, SizeRoutedCall | BatchRoutedCall)]


@contextmanager
def compiled_calls_set_aside(engine: Any) -> Iterator[None]:
    """Inside the block the engine's compiled modules run eager; their compiled calls are put back afterwards,
    untouched. For work that must not compile, such as fp8 calibration (engine/fp8_calibration.py)."""
    wrapped = [(module, module._compiled_call_impl) for module in compiled_modules(engine)]
    for module, _ in wrapped:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, compiled_call in wrapped:
            module._compiled_call_impl = compiled_call


def route_decoder(decoder: Any, options: dict[str, Any]) -> None:
    """Compile the VAE decoder with `options`, routed by image size (engine/size_routing.py); its calls that run
    uncompiled count as "decode" on /metrics."""
    decoder._compiled_call_impl = SizeRoutedCall(decoder._call_impl, options, label="decode")


def warm_up_or_fall_back_to_eager(
    engine: Any,
    sizes: list[tuple[int, int]],
    batch_sizes: list[int],
    on_progress: Callable[[str], None] | None = None,
    stop: CancelToken | None = None,
    any_size: bool = False,
) -> float:
    """Warm up; if compilation fails (an unsupported card, a torch bug), serve eager rather than not at all.

    The failure is logged and listed in the engine's levers, which health reports. A stop (GenerationCanceled)
    is not a failure: it goes to the caller. `any_size`: as warm_up's."""
    try:
        return warm_up(engine, sizes, batch_sizes, on_progress, stop, any_size)
    except GenerationCanceled:
        raise
    except Exception as error:
        if not compiled_modules(engine):
            raise
        serve_eager_from_now(engine, error, "compiled warm-up failed")
        return warm_up(engine, sizes, batch_sizes, on_progress, stop)


# Where torch.compile's work happens: tracing and compiling (dynamo, AOT autograd, inductor), running what it
# compiled (inductor's wrappers, CUDA-graph trees), capturing graphs.
_COMPILE_MACHINERY = ("torch._dynamo", "torch._functorch", "torch._inductor", "torch.cuda.graphs")
# Every call into a compiled module passes through this wrapper, also when the module's own code fails.
_COMPILED_CALL_WRAPPER = "torch._dynamo.eval_frame"


def _errors_and_frames(error: BaseException | None) -> Iterator[tuple[BaseException, FrameType | None]]:
    """The error and each cause it was re-raised from (`raise X from Y`), each first with None, then with every
    frame of its traceback."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error, None
        trace = error.__traceback__
        while trace is not None:
            yield error, trace.tb_frame
            trace = trace.tb_next
        error = error.__cause__


def raised_in_compiled_code(error: BaseException | None) -> bool:
    """Whether the error came from torch.compile's machinery (its tracing, its compilers, the CUDA-graph trees,
    the code inductor generated), not from the model code or the engine around it. Errors it re-raised with a
    cause (`raise X from Y`) are judged by their cause too."""
    for one, frame in _errors_and_frames(error):
        if frame is None:
            if type(one).__module__.startswith(("torch._dynamo.exc", "torch._inductor.exc")):
                return True
            continue
        module = frame.f_globals.get("__name__", "")
        if module.startswith(_COMPILE_MACHINERY) and module != _COMPILED_CALL_WRAPPER:
            return True
    return False


def serve_eager_from_now(engine: Any, error: BaseException, what: str) -> None:
    """Turn the engine's compiled modules back to eager for the rest of the process: slower, but serving.

    The failure is logged and listed in the engine's levers, which health reports."""
    log.error("%s, serving eager from now on: %s: %s", what, type(error).__name__, error, exc_info=error)
    for module in compiled_modules(engine):
        module._compiled_call_impl = None  # what Module.compile set; the module runs eager again
    engine.records_cuda_graphs = False
    engine.levers = [
        lever
        for lever in engine.levers
        if not lever.startswith(("torch.compile", ANY_SIZE_FAILED_PREFIX)) and lever != STOPPED_COMPILING
    ]
    engine.levers.append(f"torch.compile failed, eager instead ({type(error).__name__})")


def warm_up(
    engine: Any,
    sizes: list[tuple[int, int]],
    batch_sizes: list[int],
    on_progress: Callable[[str], None] | None = None,
    stop: CancelToken | None = None,
    any_size: bool = False,
) -> float:
    """One small generation per (size, batch) so compilation and autotuning happen now, not on a request.

    Every stage runs: the ensemble reaches base and refiner, decode reaches the VAE. Returns seconds taken.
    `on_progress` hears where it is (a cold compile takes minutes; health shows it): which warm-up of how
    many, its shape, and the last step done. `stop` ends it early (a server told to stop while it starts):
    the pass running stops within a step, and GenerationCanceled is raised. `any_size`: also one pass per batch
    size at a size outside `sizes`, which compiles the graphs every such size shares (engine/size_routing.py).
    """
    began = time.perf_counter()
    report = on_progress or (lambda _: None)
    keep_sizes_static(engine, sizes)
    if any_size and sizes and compiled_modules(engine):
        other = size_outside(sizes)
        # After the warmed-up sizes: if the shared graphs fail to compile, the static ones most requests use are
        # done, and kept (`give_up_shared_graphs`, from the engine's handling of a failed compiled pass).
        sizes_and_other = [*sizes, other]
    else:
        sizes_and_other = list(sizes)
    # One preview, as the worker makes them: a request's first preview would otherwise pay one-time costs on the
    # GPU thread in the middle of its pass (the colour map's upload, its eager kernels' first load, pinned host
    # memory, Pillow's JPEG encoder). The first request's base stage ran 70-90 ms slower than later ones (runs
    # 34 and 36 in docs/benchmarks.md), and the warm-up made no preview.
    previews: list[PreviewCopy] = []
    negatives = negative_prompts_to_warm_up(engine)
    shapes = [
        (width, height, batch, negative)
        for width, height in sizes_and_other
        for batch in batch_sizes
        for negative in negatives
    ]
    for number, (width, height, batch, negative) in enumerate(shapes, start=1):
        where = f"warm-up {number} of {len(shapes)} ({width}x{height}, batch {batch}"
        where += ", a negative prompt)" if negative else ")"
        if (width, height) not in sizes:
            where += ", the graphs for every other size"
        report(f"{where}: starting")

        def heard(event: ProgressEvent, where: str = where) -> None:
            # The next stage compiles after this event, so a message that stays long names the stage before it.
            # The decode is one pass with no steps: it said "decode step 0 of 1 done" for its whole time.
            if event.stage == DECODE_STAGE:
                report(f"{where}: {'decoded' if event.step else 'decoding'}")
            else:
                report(f"{where}: {event.stage} step {event.step} of {event.total} done")
            if not previews and event.latents is not None:
                previews.append(PreviewCopy(event.latents))

        _warm_up_pass(engine, width, height, batch, heard, stop, negative)
        log.info(
            "warm-up %dx%d batch %d%s done at %.1fs",
            width,
            height,
            batch,
            " with a negative prompt" if negative else "",
            time.perf_counter() - began,
        )
    for preview in previews:
        preview.data_url()  # the JPEG, on the host
    if getattr(engine, "records_cuda_graphs", False) and compiled_modules(engine):
        # A second round, for the CUDA graphs. CUDA-graph trees record a function on its second run (the first
        # runs eagerly), per batch size: the batched graph serves every size between 2 and the largest pass,
        # each recorded by the first pass of that size, and a module run once per pass would only be warmed by
        # the first round (the VAE decoder was, until it stopped recording graphs: decoder_compile_mode).
        # Without this round the first request recorded its graphs (4.1 s instead of 1.7 s, run 27 in
        # docs/benchmarks.md). Batch 1 is repeated too: cheap, and it does not
        # rely on which graph (engine/batch_routing.py) serves it. Short passes: seconds in all, when nothing
        # recompiles.
        second = [
            (width, height, batch, negative)
            for width, height in sizes
            for batch in range(1, max(batch_sizes) + 1)
            for negative in negatives
        ]
        # torch warns loudly past 8 graphs per function ("recording too many CUDAGraphs"); these are wanted.
        # Raised for this round only: inductor's config is part of its compile cache's key, so a lasting
        # change would make a later compile's key depend on batch_max (a cache miss when it changes).
        import torch._inductor.config

        limit = torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit
        quiet = len(second) if limit is not None and limit < len(second) else limit
        with torch._inductor.config.patch({"triton.cudagraph_dynamic_shape_warn_limit": quiet}):
            for number, (width, height, batch, negative) in enumerate(second, start=1):
                report(
                    f"warm-up, recording CUDA graphs, {number} of {len(second)} ({width}x{height}, batch {batch})"
                )
                _warm_up_pass(engine, width, height, batch, stop=stop, negative_prompt=negative)
        log.info("warm-up: CUDA graphs recorded at %.1fs", time.perf_counter() - began)
    return time.perf_counter() - began


ANY_SIZE_FAILED_PREFIX = "the graphs for sizes not warmed up failed"
ANY_SIZE_FAILED = ANY_SIZE_FAILED_PREFIX + " ({error}): those sizes run uncompiled"


def take_shared_graph_failures(engine: Any) -> bool:
    """Whether a call on a size-routed any-size graph (engine/size_routing.py) raised since last asked; clears
    the record. Asked on the GPU thread as each pass starts (a failure is judged by its own pass: an out-of-memory
    error or a refiner failure handled inside a pass leaves the record set) and as a pass fails."""
    return any([call.take_any_size_raised() for call in routed_calls(engine)])  # a list: every record cleared


_ON_SHARED_GRAPHS = "imagesmith_failed_on_shared_graphs"


def note_where_the_pass_failed(engine: Any, error: BaseException) -> None:
    """On the GPU thread, as a pass fails: mark the error with whether it failed on the graphs sizes outside
    the warm-up share, and only there (`failed_on_shared_graphs` reads the mark on the caller's thread, where
    the next pass may already be running). Not when the error passed through CUDA-graph recording or replay:
    that leaves the CUDA-graph tree the static graphs replay through in doubt (each compiled function keeps
    the tree it was first recorded in), so such a failure turns the engine eager."""
    verdict = take_shared_graph_failures(engine) and not raised_in_cuda_graph_code(error)
    # An exception type without attributes keeps no mark: judged not shared, so the engine goes eager.
    with suppress(AttributeError):
        setattr(error, _ON_SHARED_GRAPHS, verdict)


def failed_on_shared_graphs(error: BaseException) -> bool:
    """What `note_where_the_pass_failed` found for this error (False where it never looked)."""
    return bool(getattr(error, _ON_SHARED_GRAPHS, False))


# Where CUDA graphs are recorded and replayed: torch.cuda.graphs' capture, and the CUDA-graph trees' graph nodes
# and recording. Not the whole cudagraph_trees module: a CUDA-graph mode's first, eager run of a graph
# (CUDAWarmupNode) and the manager's dispatch pass through it too, and a failure there leaves no graph in doubt.
_CUDA_GRAPH_MODULE = "torch.cuda.graphs"
_CUDA_GRAPH_TREES = "torch._inductor.cudagraph_trees"
_CUDA_GRAPH_TREE_CODE = ("CUDAGraphNode.", "CUDAGraphTreeManager.record_function")


def raised_in_cuda_graph_code(error: BaseException | None) -> bool:
    """Whether the error passed through CUDA-graph recording or replay (its traceback, or its causes')."""
    for _, frame in _errors_and_frames(error):
        if frame is None:
            continue
        module = frame.f_globals.get("__name__", "")
        in_a_graph_node = module == _CUDA_GRAPH_TREES and frame.f_code.co_qualname.startswith(
            _CUDA_GRAPH_TREE_CODE
        )
        if module == _CUDA_GRAPH_MODULE or in_a_graph_node:
            return True
    return False


def give_up_shared_graphs(engine: Any, error: BaseException) -> None:
    """After a compiled pass failed in torch.compile's machinery on the graphs sizes outside the warm-up share
    (`failed_on_shared_graphs`: inductor on symbolic shapes, at the any-size warm-up or a request's compile):
    from now on such sizes run uncompiled, and the warmed-up sizes keep their static graphs. Turning the whole
    engine eager instead (serve_eager_from_now) would make every request ~1.75x slower (runs 85 and 87 in
    docs/benchmarks.md) for graphs that serve a few, and leaving the route as it was would retry the failing
    compile, minutes of it, on each such request."""
    log.error(
        "a compiled pass failed on the graphs for sizes not warmed up; the warmed-up sizes keep their compiled "
        "graphs, other sizes run uncompiled from now on: %s: %s",
        type(error).__name__,
        error,
        exc_info=error,
    )
    for call in routed_calls(engine):
        call.give_up_any_size()
    engine.levers = [
        *[lever for lever in engine.levers if not lever.startswith(ANY_SIZE_FAILED_PREFIX)],
        ANY_SIZE_FAILED.format(error=type(error).__name__),
    ]


STOPPED_COMPILING = "no compile on a request: shapes the warm-up did not run go uncompiled"


def stop_compiling_on_requests(engine: Any) -> None:
    """After the service's warm-up (unless IMAGESMITH_COMPILE_ON_REQUEST): no pass compiles from now on.

    A compile on a request takes minutes on a GPU (131 s for the base UNet's graph alone, run 82 in
    docs/benchmarks.md), on the GPU thread, so every queued request waits behind it; uncompiled, one pass is
    slower (eager bf16: 2.08 s against 1.33 s for the 40-step ensemble, runs 47 and 70) and no one waits for it.
    The routed calls (engine/size_routing.py) run a route the warm-up never ran, and a call their graphs' guards
    reject (a pass of one row per image, with guidance_scale <= 1; a size the any-size graph was specialised
    against), uncompiled, and log and count it. Each pass also runs under `no_compiling_on_requests`, for modules
    compiled without routing."""
    if not compiled_modules(engine):
        return
    for call in routed_calls(engine):
        call.stop_compiling()
    engine.compiles_on_request = False
    engine.levers = [*engine.levers, STOPPED_COMPILING]


_PASSES_NOT_COMPILING = 0  # passes under way with the stance below: it is torch's global one, not per thread
_PASSES_NOT_COMPILING_LOCK = threading.Lock()


@contextmanager
def no_compiling_on_requests(engine: Any) -> Iterator[None]:
    """Around a pass: after `stop_compiling_on_requests`, dynamo runs a call its graphs' guards reject uncompiled
    instead of recompiling ("eager_on_recompile"; graphs whose guards pass still run). Routed calls log such calls
    (engine/size_routing.py); this covers modules compiled without routing (IMAGESMITH_COMPILE_DYNAMIC's UNets).

    The stance is process-wide, so it is set by the first such pass under way and put back by the last: with
    torch's own save-and-restore, two engines' passes on two threads (tests, benchmarks) could leave it set."""
    global _PASSES_NOT_COMPILING
    if getattr(engine, "compiles_on_request", True):
        yield
        return
    with _PASSES_NOT_COMPILING_LOCK:
        if _PASSES_NOT_COMPILING == 0:
            torch.compiler.set_stance("eager_on_recompile")
        _PASSES_NOT_COMPILING += 1
    try:
        yield
    finally:
        with _PASSES_NOT_COMPILING_LOCK:
            _PASSES_NOT_COMPILING -= 1
            if _PASSES_NOT_COMPILING == 0:
                torch.compiler.set_stance("default")


def size_outside(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """An image size (width, height) not in `sizes`, for compiling the graphs shared by every other size: the
    smallest warm-up size's width, and the nearest height below it (else above) that is a multiple of 64 px and
    differs from the width.
    - The smallest: the shared decoder graph takes the attention route of the size it is compiled at, and a
      first size above the bound (1536x1536,1024x1024) left every smaller unlisted size decoding uncompiled.
    - Close to a warmed-up size, so its pass costs about the same, and below the decoder's attention bound when
      that size is (engine/decoder_attention.py), where most requests fall.
    - A multiple of 64 px: the UNet's upsampling checks whether the latents' sides divide by 4 (pixels by 32),
      so a first size that did not would leave a graph that the usual sizes do not fit.
    - Not square: dynamo would give height and width one symbol, and recompile at the first oblong size."""
    width, height = min(sizes, key=lambda size: size[0] * size[1])
    nearest = max(MIN_SIDE, height - height % 64)
    below = range(nearest, MIN_SIDE - 1, -64)
    above = range(nearest + 64, MAX_SIDE + 1, 64)
    for candidate in [*below, *above]:
        if candidate != width and (width, candidate) not in sizes:
            return width, candidate
    raise ValueError(f"no image size of width {width} outside the warm-up sizes {sizes}")


def keep_sizes_static(engine: Any, sizes: list[tuple[int, int]]) -> None:
    """Tell the engine's size-routed compiled calls (engine/size_routing.py) which image sizes (width, height)
    are warmed up: those keep static graphs, every other size shares one graph dynamic in height and width."""
    scale_factor = engine.models.base.vae_scale_factor
    for call in routed_calls(engine):
        for width, height in sizes:
            call.keep_static(latent_size_of_image(width, height, scale_factor))


# What a warm-up pass of a request with a negative prompt sends (any text: its graphs do not depend on it).
WARM_UP_NEGATIVE_PROMPT = "warm-up, negative"


def negative_prompts_to_warm_up(engine: Any) -> list[str]:
    """The warm-up's negative prompts: none, and with the empty-negative shortcut compiled also one, since the
    base's traced cross-attentions then differ with and without one (engine/empty_negative.py)."""
    wrapped = empty_negative.switch_of(engine.models.base.unet) is not None
    return ["", WARM_UP_NEGATIVE_PROMPT] if wrapped and compiled_modules(engine) else [""]


def records_cuda_graphs(settings: Settings, levers: list[str]) -> bool:
    """Whether the engine's compiled modules record CUDA graphs: a CUDA-graph mode, and compile applied (it is
    skipped under offload)."""
    return settings.compile in CUDA_GRAPH_MODES and any(
        lever.startswith("torch.compile(") for lever in levers
    )


def _warm_up_pass(
    engine: Any,
    width: int,
    height: int,
    batch: int,
    on_progress: Callable[[Any], None] | None = None,
    stop: CancelToken | None = None,
    negative_prompt: str = "",
) -> None:
    """One short generation of `batch` images: every stage runs (the ensemble reaches base and refiner)."""
    from imagesmith.engine.engine import BatchItem
    from imagesmith.schemas import GenerationRequest

    if stop is not None and stop.canceled:
        raise GenerationCanceled("warm-up stopped")
    request = GenerationRequest(
        prompt="warm-up",
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=5,
        high_noise_frac=0.6,
        seed=0,
    )
    for outcome in engine.generate_batch([BatchItem(request, on_progress, stop) for _ in range(batch)]):
        if isinstance(outcome, BaseException):
            raise outcome
