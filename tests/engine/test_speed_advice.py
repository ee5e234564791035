"""`imagesmith doctor`'s speed lines (engine/speed_advice.py): what runs, and the levers each card could add,
for cards faked as in test_hardware_plan.py."""

from __future__ import annotations

import dataclasses

from imagesmith.config import CompileChoice, OffloadChoice, Settings
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.engine.speed_advice import speed_lines

H100 = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=79.6, free_memory_gib=78.9)
A100 = DeviceInfo("cuda", name="A100", capability=(8, 0), total_memory_gib=79.2, free_memory_gib=78.5)
RTX4090 = DeviceInfo("cuda", name="RTX 4090", capability=(8, 9), total_memory_gib=23.6, free_memory_gib=22.4)
RTX3060_12GB = DeviceInfo(
    "cuda", name="RTX 3060", capability=(8, 6), total_memory_gib=11.8, free_memory_gib=11.2
)
CPU = DeviceInfo("cpu")


def lines_for(device: DeviceInfo, settings: Settings) -> list[str]:
    return speed_lines(settings, device, plan_hardware(device, settings))


def tries(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("try: ")]


def test_a_cpu_is_told_what_runs_and_offered_nothing() -> None:
    lines = lines_for(CPU, Settings())
    assert lines == ["speed: eager (IMAGESMITH_COMPILE=off, the default: nothing to compile)"]


def test_each_card_is_offered_the_levers_it_has() -> None:
    a100 = tries(lines_for(A100, Settings()))
    assert len(a100) == 1 and "IMAGESMITH_COMPILE=reduce-overhead" in a100[0]  # no fp8 tensor cores
    ada = tries(lines_for(RTX4090, Settings()))
    assert [line.split()[1] for line in ada] == ["IMAGESMITH_COMPILE=reduce-overhead", "IMAGESMITH_FP8=true"]
    hopper = tries(lines_for(H100, Settings()))
    assert len(hopper) == 3 and "IMAGESMITH_FP8_CONVS=true" in hopper[2]


def test_a_card_that_offloads_is_told_why_compile_cannot_help() -> None:
    settings = Settings(compile=CompileChoice.REDUCE_OVERHEAD)
    lines = lines_for(RTX3060_12GB, settings)
    assert lines[0] == "speed: eager: IMAGESMITH_COMPILE=reduce-overhead is skipped with offload=model"
    assert tries(lines) == [lines[1]] and "need the models resident" in lines[1]


def test_a_server_with_every_lever_on_is_told_what_runs_and_offered_nothing() -> None:
    settings = Settings(
        compile=CompileChoice.REDUCE_OVERHEAD,
        warmup_sizes="1024x1024,1216x832",
        batch_max_images=4,
        timed_reductions=True,
    )
    # fp8 convolutions need NVIDIA's cuDNN frontend to be planned; the plan is what speed_lines reads.
    plan = dataclasses.replace(
        plan_hardware(H100, settings), fp8="static", fp8_convs=True, fp8_fused_geglu=True
    )
    lines = speed_lines(settings, H100, plan)
    assert tries(lines) == []
    assert lines[0].startswith(
        "speed: torch.compile reduce-overhead, norms timed persistent or looped (IMAGESMITH_TIMED_REDUCTIONS); "
        "a server compiles at start-up for "
    )
    # Two warm-up sizes, each its own static graphs; another size runs uncompiled (Settings.warms_up_any_size).
    assert "for 1024x1024, 1216x832, batch 1 and 4; another size runs uncompiled" in lines[0]
    assert lines[0].endswith("lossy: fp8 linears (static scales), fp8 convolutions, fused fp8 GEGLU")


def test_an_offload_the_user_chose_is_named_as_what_to_unset() -> None:
    settings = Settings(offload=OffloadChoice.MODEL)
    lines = lines_for(H100, settings)  # 78.9 GiB free: `auto` would keep the models resident
    assert tries(lines) == [lines[1]] and lines[1].startswith("try: unsetting IMAGESMITH_OFFLOAD=model")


def test_without_a_warm_up_the_line_says_shapes_compile_on_first_use() -> None:
    settings = Settings(compile=CompileChoice.REDUCE_OVERHEAD, warmup=False)
    assert (
        "IMAGESMITH_WARMUP=false: each new shape compiles on its first request"
        in lines_for(H100, settings)[0]
    )


def test_compile_regions_are_named_in_what_runs() -> None:
    settings = Settings(compile=CompileChoice.DEFAULT, compile_regions=True, timed_reductions=False)
    assert lines_for(A100, settings)[0].startswith(
        "speed: torch.compile default, each kind of transformer block once (IMAGESMITH_COMPILE_REGIONS); "
    )


def test_timed_reductions_are_named_in_what_runs() -> None:
    settings = Settings(compile=CompileChoice.REDUCE_OVERHEAD, timed_reductions=True)
    assert lines_for(H100, settings)[0].startswith(
        "speed: torch.compile reduce-overhead, norms timed persistent or looped (IMAGESMITH_TIMED_REDUCTIONS); "
    )
    assert (
        "IMAGESMITH_TIMED_REDUCTIONS"
        not in lines_for(H100, Settings(compile=CompileChoice.REDUCE_OVERHEAD, timed_reductions=False))[0]
    )


def test_warming_up_any_size_is_named_where_it_is_on() -> None:
    settings = Settings(compile=CompileChoice.REDUCE_OVERHEAD, warmup_any_size=True)
    line = lines_for(H100, settings)[0]
    assert "for 1024x1024, batch 1 and 8, and the graphs every other size shares" in line
    assert "~2.4x a size's compile, other sizes' UNet calls ~1.26x" in line  # with channels-last (run 88)
    assert "on its first request" not in line
    # Without CUDA graphs the shared graph is host-bound, no faster than uncompiled (runs 89-90): said, with the fix.
    default = lines_for(H100, Settings(compile=CompileChoice.DEFAULT, warmup_any_size=True))[0]
    assert "(IMAGESMITH_WARMUP_ANY_SIZE: they run host-bound without CUDA graphs" in default
    assert "use IMAGESMITH_COMPILE=reduce-overhead)" in default and "~1.26x" not in default
    nchw = Settings(compile=CompileChoice.REDUCE_OVERHEAD, warmup_any_size=True, channels_last=False)
    assert "~3.4x a size's compile, other sizes' UNet calls ~1.3x" in lines_for(H100, nchw)[0]  # run 87
    line = lines_for(H100, Settings(compile=CompileChoice.REDUCE_OVERHEAD))[0]
    assert "for 1024x1024, batch 1 and 8; another size runs uncompiled (~1.75x a warmed size's time)" in line
    assert "list it in IMAGESMITH_WARMUP_SIZES" in line
    line = lines_for(H100, Settings(compile=CompileChoice.REDUCE_OVERHEAD, compile_on_request=True))[0]
    assert "for 1024x1024, batch 1 and 8; another size compiles once, on its first request" in line
    assert "over 4 minutes on an H100, every queued request waiting" in line and "host-bound" not in line
    line = lines_for(H100, Settings(compile=CompileChoice.DEFAULT, compile_on_request=True))[0]
    assert "every queued request waiting); what it compiles runs host-bound without CUDA" in line


def test_timed_reductions_come_with_compile_and_are_offered_only_where_turned_off() -> None:
    compiled = Settings(compile=CompileChoice.REDUCE_OVERHEAD)
    assert "norms timed persistent or looped" in lines_for(A100, compiled)[0]
    assert not any("TIMED_REDUCTIONS" in line for line in tries(lines_for(A100, compiled)))
    turned_off = compiled.with_changes(timed_reductions=False)
    assert "norms timed" not in lines_for(A100, turned_off)[0]
    offered = [line for line in tries(lines_for(A100, turned_off)) if "IMAGESMITH_TIMED_REDUCTIONS" in line]
    assert len(offered) == 1 and "unset" in offered[0] and "exact" in offered[0]
    # Not before compiling: the compile line comes first, and eager runs no compiled reduction.
    assert "norms timed" not in lines_for(A100, Settings())[0]
    assert not any(
        "TIMED_REDUCTIONS" in line for line in tries(lines_for(A100, Settings(timed_reductions=False)))
    )
