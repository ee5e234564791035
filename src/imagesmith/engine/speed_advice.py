"""`imagesmith doctor`'s speed lines: what these settings run on this device, and the levers it could add.

Why: the levers are off by default (a one-shot command would pay minutes of compilation), so a server left at
the defaults runs eager at about half the speed it could (on an H200: 2.6-3.4 s against 1.330 s for a 40-step
ensemble image, docs/benchmarks.md run 70). The doctor is where a user looks before starting a server, so it
names the settings that would help on this device, each with its measured figure and its price.
"""

from __future__ import annotations

from imagesmith.config import CUDA_GRAPH_MODES, CompileChoice, OffloadChoice, Settings
from imagesmith.engine.compile_regions import regions_supported
from imagesmith.engine.fast import channels_last_wanted, compile_cache_root, timed_reductions_wanted
from imagesmith.engine.hardware import FP8_MIN_CAPABILITY, DeviceInfo, HardwarePlan
from imagesmith.sources.generate import warm_up_batches

HOPPER = (9, 0)  # fp8 convolutions through cuDNN need it (engine/fp8_conv.py)
# What the graphs shared by sizes outside the warm-up give in a compile mode without CUDA graphs (run 89).
NO_CUDA_GRAPHS = (
    "host-bound without CUDA graphs, no faster than running other sizes uncompiled: use "
    "IMAGESMITH_COMPILE=reduce-overhead"
)


def speed_lines(settings: Settings, device: DeviceInfo, plan: HardwarePlan) -> list[str]:
    """A line on what runs (from the plan: what the settings asked and this device allows), then a "try:"
    line for each lever this device has and the settings leave off."""
    lines = [f"speed: {_what_runs(settings, plan)}"]
    if device.kind != "cuda":
        return lines  # CUDA graphs and fp8 tensor cores are CUDA's; here the defaults are what there is
    if plan.offload != "none":
        if settings.offload is not OffloadChoice.AUTO:  # the user chose offload: the way out is to unset it
            lines.append(
                f"try: unsetting IMAGESMITH_OFFLOAD={settings.offload.value}: compilation and CUDA graphs need the "
                "models resident on the GPU, which `auto` chooses from 16 GiB free (12 GiB with IMAGESMITH_FP8 on "
                "an fp8 card)"
            )
        else:
            lines.append(
                "try: nothing more here: compilation and CUDA graphs need the models resident on the GPU, which the "
                "plan chooses from 16 GiB free (12 GiB with IMAGESMITH_FP8 on an fp8 card)"
            )
        return lines
    if settings.compile not in CUDA_GRAPH_MODES:
        lines.append(
            "try: IMAGESMITH_COMPILE=reduce-overhead for a long-running server (exact: an ensemble image in "
            "1.263 s against eager's 2.3-3.4 s on an H200, run 103; the first start compiles for minutes)"
        )
    elif settings.timed_reductions is False:  # on by default with compile: offered where it was turned off
        lines.append(
            "try: leaving IMAGESMITH_TIMED_REDUCTIONS unset (on with compile; exact: an ensemble image 1.302 -> "
            "1.263 s on an H200, run 103; the batched graphs' first compile takes longer)"
        )
    capability = device.capability or (0, 0)
    if capability >= FP8_MIN_CAPABILITY and plan.fp8 is None:
        lines.append(
            "try: IMAGESMITH_FP8=true with a compile mode, for more images a GPU (lossy: 43.9 dB from bf16; "
            "an ensemble image in 1.209 s and 7.6 GiB on an H200)"
        )
    if capability >= HOPPER and not (plan.fp8_convs and plan.fp8_fused_geglu):
        lines.append(
            "try: with IMAGESMITH_FP8, also IMAGESMITH_FP8_CONVS=true and IMAGESMITH_FP8_FUSED_GEGLU=true on "
            "this Hopper card (lossy: 36.7-38.9 dB; 2.010 images/s at the MLPerf setting on an H200)"
        )
    return lines


def _what_runs(settings: Settings, plan: HardwarePlan) -> str:
    if settings.compile is CompileChoice.OFF:
        what = "eager (IMAGESMITH_COMPILE=off, the default: nothing to compile)"
    elif plan.offload != "none":
        what = f"eager: IMAGESMITH_COMPILE={settings.compile.value} is skipped with offload={plan.offload}"
    else:
        if settings.warmup:
            sizes = ", ".join(f"{width}x{height}" for width, height in settings.warmup_size_list())
            batches = " and ".join(map(str, warm_up_batches(settings)))
            when = f"a server compiles at start-up for {sizes}, batch {batches}"
            # What a request at another size meets (engine/size_routing.py, fast.size_outside).
            # The prices are runs 87-88's (an H100): the shared graph compiles ~2.4x longer than a static one and
            # runs a UNet call ~26 % slower with channels-last weights, ~3.4x and ~29 % without; uncompiled, a
            # size takes ~1.75x a warmed one's time (run 85).
            if settings.warms_up_any_size():
                if settings.compile not in CUDA_GRAPH_MODES:
                    # The prices below are reduce-overhead's. Without CUDA graphs the shared graph is host-bound:
                    # 69.0 ms a base call (run 89), where an uncompiled one takes 68.9 (run 90, channels-last).
                    prices = f"they run {NO_CUDA_GRAPHS}"
                else:
                    compile_price, call_price = (
                        ("~2.4x", "~1.26x") if channels_last_wanted(settings, plan) else ("~3.4x", "~1.3x")
                    )
                    prices = f"{compile_price} a size's compile, other sizes' UNet calls {call_price} a warmed size's"
                when += f", and the graphs every other size shares (IMAGESMITH_WARMUP_ANY_SIZE: {prices})"
            elif settings.compile_on_request:
                when += (
                    "; another size compiles once, on its first request (IMAGESMITH_COMPILE_ON_REQUEST: over "
                    "4 minutes on an H100, every queued request waiting)"
                )
                if settings.compile not in CUDA_GRAPH_MODES:  # the same shared graphs, host-bound (run 89)
                    when += f"; what it compiles runs {NO_CUDA_GRAPHS}"
            else:
                when += (
                    "; another size runs uncompiled (~1.75x a warmed size's time), never compiling on a request "
                    "(list it in IMAGESMITH_WARMUP_SIZES, or IMAGESMITH_WARMUP_ANY_SIZE=true for every size)"
                )
        else:
            when = "IMAGESMITH_WARMUP=false: each new shape compiles on its first request"
        cache = f"compile cache {compile_cache_root(settings)} (keep it: a restart reuses it)"
        regions = ""
        if settings.compile_regions:  # the engine skips them, with a warning, on a torch without regions
            regions = ", each kind of transformer block once (IMAGESMITH_COMPILE_REGIONS)"
            regions = regions if regions_supported() else ", not IMAGESMITH_COMPILE_REGIONS (torch too old)"
        timed = (
            ", norms timed persistent or looped (IMAGESMITH_TIMED_REDUCTIONS)"
            if timed_reductions_wanted(settings)
            else ""
        )
        what = f"torch.compile {settings.compile.value}{regions}{timed}; {when}; {cache}"
    lossy = [f"fp8 linears ({plan.fp8} scales)"] if plan.fp8 else []
    lossy += ["fp8 convolutions"] if plan.fp8_convs else []
    lossy += ["fused fp8 GEGLU"] if plan.fp8_fused_geglu else []
    return what + (f"; lossy: {', '.join(lossy)}" if lossy else "")
