"""The CLI as a user runs it: a real process, the tiny model, files on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from imagesmith.config import Settings
from imagesmith.engine.output import parse_a1111_parameters, read_parameters

# The command line of `imagesmith` in a child process, as the tests start it.
CLI = (sys.executable, "-m", "imagesmith.cli")


def cli_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`imagesmith ARGS` in a subprocess, with `env` over this process's environment."""
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def tiny_env(home: Path) -> dict[str, str]:
    """The settings of a run on the tiny model, on the CPU, with `home` as the data dir."""
    return {"IMAGESMITH_DATA_DIR": str(home), "IMAGESMITH_MODEL": "tiny", "IMAGESMITH_DEVICE": "cpu"}


# A 64x64 image in a few steps: enough for tests of where the image goes, not of what it holds.
SMALL_IMAGE = ("--width", "64", "--height", "64", "--steps", "2")


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """On the tiny model, on the CPU, with `home` as the data dir."""
    return cli_with(tiny_env(home), *args)


def tiny_process(home: Path, cwd: Path, *args: str, **streams: Any) -> subprocess.CompletedProcess[bytes]:
    """`imagesmith ARGS` on the tiny model, on the CPU, run in `cwd` with its output as bytes (or where
    `streams` says): for tests of what stdout itself carries."""
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, **tiny_env(home)},
        cwd=cwd,
        timeout=300,
        **streams,
    )


def test_generate_writes_images_with_parameters(tiny_model_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "hero.webp"
    done = run_cli(
        "generate",
        "a red bicycle",
        "-o",
        str(out),
        "--width",
        "128",
        "--height",
        "64",
        "--steps",
        "10",
        "--seed",
        "77",
        "--num-images",
        "2",
        "--json",
        home=tiny_model_home,
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert meta["seeds"] == [77, 78] and meta["refined"] is True
    paths = [tmp_path / "hero_0.webp", tmp_path / "hero_1.webp"]
    assert meta["files"] == [str(path) for path in paths]  # the names the CLI chose, which --json left unsaid
    for path, seed in zip(paths, (77, 78), strict=True):
        with Image.open(path) as image:
            assert (image.format, image.size) == ("WEBP", (128, 64))
        assert parse_a1111_parameters(read_parameters(path) or "")["Seed"] == str(seed)
    # The progress bars go to stderr, one per stage.
    assert "base" in done.stderr and "refine" in done.stderr


def test_bad_option_exits_2_naming_the_option(tiny_model_home: Path, tmp_path: Path) -> None:
    done = run_cli("generate", "x", "--width", "1001", "-o", str(tmp_path / "x.png"), home=tiny_model_home)
    assert done.returncode == 2
    assert "--width: must be a multiple of 8, got 1001" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()


def test_a_negative_seed_says_how_to_get_a_random_one(tiny_model_home: Path, tmp_path: Path) -> None:
    """A1111's -1 for "random" got "Input should be greater than or equal to 0", and no way forward."""
    done = run_cli("generate", "x", "--seed", "-1", "-o", str(tmp_path / "x.png"), home=tiny_model_home)
    assert done.returncode == 2
    assert "--seed: must be 0 or more, got -1; leave the seed out for a random one" in done.stderr


def test_doctor_prints_device_plan_and_models(tiny_model_home: Path) -> None:
    done = run_cli("doctor", home=tiny_model_home)
    assert done.returncode == 0, done.stderr
    assert "device: cpu" in done.stdout
    assert "plan: device=cpu dtype=fp32" in done.stdout
    assert "models: tiny (built-in, random weights) at " in done.stdout
    assert ": base and refiner load" in done.stdout
    assert "pexels: not configured" in done.stdout  # the Pexels part, from the same settings


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has Apple MPS")
def test_doctor_and_generate_name_the_fix_for_a_device_torch_cannot_use(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """IMAGESMITH_DEVICE=mps without MPS: doctor printed the device as fine and then a traceback, and generate
    failed with torch's own message and no fix."""
    env = {
        "IMAGESMITH_DATA_DIR": str(tiny_model_home),
        "IMAGESMITH_MODEL": "tiny",
        "IMAGESMITH_DEVICE": "mps",
    }
    doctor = cli_with(env, "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "Traceback" not in doctor.stderr + doctor.stdout
    assert "Apple MPS is not built into this torch" in doctor.stdout + doctor.stderr
    assert "set IMAGESMITH_DEVICE=cpu" in doctor.stdout + doctor.stderr
    # The other checks still run (doctor stopped at the device line): the data dir, the models, Pexels.
    assert "hub: " in doctor.stdout and "not checked (no plan for the device above)" in doctor.stdout
    assert "pexels" in doctor.stdout.lower()
    assert "doctor: 1 problem(s) above" in doctor.stdout
    generate = cli_with(env, "generate", "x", "--steps", "2", "-o", str(tmp_path / "x.png"))
    assert generate.returncode != 0 and "Traceback" not in generate.stderr
    assert "set IMAGESMITH_DEVICE=cpu" in generate.stderr, generate.stderr


@pytest.mark.parametrize("damaged", ["tiny-sdxl-base", "tiny-sdxl-refiner"])
def test_doctor_loads_the_tiny_model_and_names_the_fix_when_it_is_damaged(
    tiny_model_home: Path, tmp_path: Path, damaged: str
) -> None:
    """A tiny model damaged after it was built (its UNet weights gone) passed doctor, which only looked for
    the folder, and failed the first generation."""
    home = tmp_path / "data"
    shutil.copytree(tiny_model_home, home)
    for weights in (home / "tiny-model" / damaged / "unet").glob("*.safetensors"):
        weights.unlink()
    done = run_cli("doctor", home=home)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"models: tiny at {home / 'tiny-model'}: ERROR" in done.stdout
    assert f"delete {home / 'tiny-model'} and run again" in done.stdout
    assert "Traceback" not in done.stderr


def test_doctor_tells_whether_real_models_resolve(tiny_model_home: Path, tmp_path: Path) -> None:
    env_home = tmp_path / "hf"
    env = {
        "IMAGESMITH_DATA_DIR": str(tiny_model_home),
        "HF_HOME": str(env_home),
        "HF_HUB_OFFLINE": "1",
        "IMAGESMITH_REFINER_MODEL": str(tmp_path / "missing"),
    }
    done = cli_with(env, "doctor")
    assert done.returncode == 1, done.stderr  # a script or a container's check can act on it
    assert (
        "stabilityai/stable-diffusion-xl-base-1.0: hub id, not cached: offline mode, will fail. Fix: unset "
        "HF_HUB_OFFLINE for the first load, or `hf download stabilityai/stable-diffusion-xl-base-1.0"
        in done.stdout
    )
    assert "local path that does not exist; set IMAGESMITH_REFINER_MODEL to an existing folder" in done.stdout
    assert done.stdout.rstrip().endswith(
        "doctor: 2 problem(s) above will stop imagesmith working as configured"
    )


def doctor_with_hub_at(endpoint: str, home: Path, hf_home: Path) -> tuple[int, str]:
    """doctor's output with the real (uncached) hub ids and the hub at `endpoint` (HF_ENDPOINT, a local
    address: conftest's HF_HUB_OFFLINE is lifted for it, and the real hub is still never reached)."""
    env = {
        "IMAGESMITH_DATA_DIR": str(home),
        "HF_HOME": str(hf_home),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
    }
    done = cli_with(env, "doctor")
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout


def test_doctor_says_when_the_hub_cannot_be_reached_and_how_to_load_models_anyway(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """On an air-gapped server "downloads on first load" was a promise the first request broke. A port nothing
    listens on stands for the unreachable hub; a local HTTP server for the reachable one."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    code, out = doctor_with_hub_at(f"http://127.0.0.1:{closed_port}", tiny_model_home, tmp_path / "hf")
    assert code == 1 and "hub: downloads allowed" in out
    base = next(line for line in out.splitlines() if line.startswith("base model:"))
    assert f"the hub is not reachable (http://127.0.0.1:{closed_port}: ConnectError)" in base
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR" in base
    assert "IMAGESMITH_BASE_MODEL" in base
    assert "IMAGESMITH_REFINER_MODEL" in next(
        line for line in out.splitlines() if line.startswith("refiner:")
    )

    class AnyAnswer(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)  # any answer: the network works, whatever the status
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), AnyAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out = doctor_with_hub_at(
            f"http://127.0.0.1:{server.server_port}", tiny_model_home, tmp_path / "hf"
        )
    finally:
        server.shutdown()
    assert code == 0, out
    assert "stabilityai/stable-diffusion-xl-base-1.0: hub id, not cached: downloads on first load" in out
    assert "not reachable" not in out


def test_a_split_with_no_step_is_said_in_options_with_the_fewest_steps_that_work(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """The request's message names its fields (num_inference_steps); the user typed --steps. Blamed: the
    option they set, --steps when the split is the default."""
    out = str(tmp_path / "never.png")
    done = run_cli("generate", "x", "--steps", "1", "-o", out, home=tiny_model_home)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "imagesmith generate: error: --steps: 1 step(s) at --high-noise-frac 0.8 (the default) leave the base or "
        "the refiner no step; raise --steps to 2 or more"
    )
    done = run_cli(
        "generate", "x", "--steps", "3", "--high-noise-frac", "0.1", "-o", out, home=tiny_model_home
    )
    assert done.returncode == 2
    assert done.stderr.startswith("imagesmith generate: error: --high-noise-frac: ")
    assert done.stderr.rstrip().endswith(
        "raise --steps to 10 or more, or move --high-noise-frac closer to 0.5"
    )


def test_an_output_path_that_cannot_be_written_is_refused_before_the_models_load(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """It was found after the generation (minutes with SDXL), as a traceback. A name whose suffix disagrees
    with --format is refused like a suffix of no format; a name with no suffix gets the format's."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    refused = {
        str(folder): f"{folder} is a folder; give a file name, e.g. {folder / 'image.png'}",
        str(a_file / "hero.png"): f"{a_file} is a file, so {a_file / 'hero.png'} cannot be made",
    }
    for output, message in refused.items():
        done = run_cli("generate", "x", "-o", output, home=tiny_model_home)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"imagesmith generate: error: --output: {message}"), done.stderr
        assert "loading base model" not in done.stderr  # refused before any work
    done = run_cli(
        "generate", "x", "-o", str(tmp_path / "hero.png"), "--format", "jpeg", home=tiny_model_home
    )
    assert done.returncode == 2
    assert "hero.png is named as png but --format is jpeg; name the file hero.jpg" in done.stderr
    assert not (tmp_path / "hero.png").exists()
    small = ("--width", "64", "--height", "64", "--steps", "2")
    done = run_cli(
        "generate", "x", *small, "-o", str(tmp_path / "hero"), "--format", "webp", home=tiny_model_home
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "hero.webp").format == "WEBP"
    assert not (tmp_path / "hero").exists()
    assert not list(tmp_path.glob(".*.part"))  # the temporary file was renamed, not left


def test_each_of_several_images_output_names_is_checked_before_the_generation(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """Only m.png was checked: the generation ran, m_0.png was written, then m_1.png (a folder) failed."""
    (tmp_path / "m_1.png").mkdir()
    done = run_cli(
        "generate",
        "x",
        "--steps",
        "2",
        "--num-images",
        "2",
        "-o",
        str(tmp_path / "m.png"),
        home=tiny_model_home,
    )
    assert done.returncode == 2, done.stderr
    assert f"--output: {tmp_path / 'm_1.png'} is a folder" in done.stderr, done.stderr
    assert not (tmp_path / "m_0.png").exists() and "base" not in done.stderr  # nothing generated


def test_a_device_takes_one_image_and_several_are_refused_before_the_generation(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """'-o /dev/null' wrote /dev/null.png; several images would have been null_0.png, ... in /dev."""
    many = run_cli(
        "generate", "x", "--steps", "2", "--num-images", "2", "-o", "/dev/null", home=tiny_model_home
    )
    assert many.returncode == 2, many.stderr
    assert "--output: /dev/null is a device or a pipe, not a file, and takes one image" in many.stderr
    assert "base" not in many.stderr  # nothing generated
    one = run_cli("generate", "x", "--steps", "2", "-o", "/dev/null", "--json", home=tiny_model_home)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["files"] == ["/dev/null"]
    assert Path("/dev/null").is_char_device() and not Path("/dev/null.png").exists()


def test_a_data_dir_that_cannot_be_made_is_named_as_a_setting(tmp_path: Path) -> None:
    """It was a FileNotFoundError traceback from deep in the tiny model's build (generate, bench, serve)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {"IMAGESMITH_DATA_DIR": str(blocker / "data"), "IMAGESMITH_MODEL": "tiny"}
    bench = ["bench", "--width", "64", "--height", "64", "--steps", "2", "--runs", "1"]  # exit 1 it was
    for command in (
        ["generate", "x", "-o", str(tmp_path / "x.png")],
        ["serve", "--port", "1"],
        bench,
        ["doctor"],
    ):
        done = cli_with(env, *command)
        assert done.returncode == (1 if command == ["doctor"] else 2), (command, done.stderr)
        assert "Traceback" not in done.stderr
        assert f"IMAGESMITH_DATA_DIR: cannot create {blocker / 'data'}" in done.stderr + done.stdout, command
        if command == ["doctor"]:  # the tiny model lives there: not loaded, and not counted twice
            assert "models: tiny at " in done.stdout and "not checked (the data dir above" in done.stdout
            assert "doctor: 1 problem(s)" in done.stdout
    # Given as serve's option, the folder is named as the option the user typed, not the setting it becomes.
    done = cli_with({"IMAGESMITH_MODEL": "tiny"}, "serve", "--port", "1", "--data-dir", str(blocker / "data"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"--data-dir: cannot create {blocker / 'data'}" in done.stderr, done.stderr


def test_a_file_where_the_images_folder_goes_is_named_as_the_data_dir_setting(tmp_path: Path) -> None:
    """serve ended its start in a FileExistsError traceback (exit 3) and doctor found nothing (black-box bb-51)."""
    (tmp_path / "images").write_text("hello")
    env = {"IMAGESMITH_DATA_DIR": str(tmp_path), "IMAGESMITH_MODEL": "tiny"}
    for command, code in ((["serve", "--port", "1"], 2), (["doctor"], 1)):
        done = cli_with(env, *command)
        assert done.returncode == code, (command, done.stderr)
        assert "Traceback" not in done.stderr
        said = done.stderr + done.stdout
        assert f"IMAGESMITH_DATA_DIR: {tmp_path / 'images'} is a file" in said and "move that file" in said, (
            said
        )


def test_a_job_store_sqlite_cannot_open_is_named_with_the_fix(tmp_path: Path) -> None:
    """A full or failing disk said only "cannot open the job store: disk I/O error": no file, no fix."""
    (tmp_path / "jobs.sqlite3").mkdir()  # SQLite cannot open it, as it cannot open a file on a failing disk
    done = cli_with(
        {"IMAGESMITH_DATA_DIR": str(tmp_path), "IMAGESMITH_MODEL": "tiny"}, "serve", "--port", "1"
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot open the job store {tmp_path / 'jobs.sqlite3'}: " in done.stderr, done.stderr
    assert "or set IMAGESMITH_DATA_DIR to another folder" in done.stderr


def test_options_that_contradict_or_fall_outside_their_range_are_named_as_typed(
    tiny_model_home: Path,
) -> None:
    """--no-refine won over --mode ensemble without a word; --port and --batch were blamed on the settings
    they become (IMAGESMITH_PORT, IMAGESMITH_BATCH_MAX_IMAGES), which the user never set; an unknown device
    was an exit 1 from deep in the engine's start."""
    expected = {
        ("generate", "x", "--no-refine", "--mode", "ensemble"): "imagesmith generate: error: --no-refine: "
        "conflicts with --mode ensemble; drop one",
        (
            "serve",
            "--port",
            "99999",
        ): "imagesmith serve: error: --port: Input should be less than or equal to 65535 (got 99999)",
        (
            "serve",
            "--device",
            "gpu",
        ): "imagesmith serve: error: --device: device must be 'auto', 'cpu', 'mps', "
        "'cuda' or 'cuda:N' (got 'gpu')",
        ("bench", "--batch", "40"): "imagesmith bench: error: --batch: must be 1 to 32, got 40",
    }
    for args, message in expected.items():
        done = run_cli(*args, home=tiny_model_home)
        assert (done.returncode, done.stderr.strip()) == (2, message), args
    done = cli_with({"IMAGESMITH_DATA_DIR": str(tiny_model_home), "IMAGESMITH_DEVICE": "gpu"}, "doctor")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "imagesmith: error: IMAGESMITH_DEVICE: device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N' (got 'gpu')"
    )


def test_serve_on_a_busy_port_says_so_before_starting(tiny_model_home: Path) -> None:
    """uvicorn binds after the start-up: a busy port ended the models' load in a traceback (exit 3)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("serve", "--port", str(port), home=tiny_model_home)
    assert done.returncode == 2, done.stderr
    assert (
        f"imagesmith serve: error: port: 127.0.0.1:{port} cannot be listened on (Address already in use)"
        in (done.stderr)
    )
    assert "Traceback" not in done.stderr and "loading base model" not in done.stderr


def test_serve_on_an_address_not_of_this_machine_blames_the_host_not_the_port(tiny_model_home: Path) -> None:
    """It said "port: ... cannot be listened on; choose another (--port ...)", a fix that cannot work."""
    # With API keys the host asked for is used (without, the server listens on loopback whatever is asked).
    done = cli_with(
        {**tiny_env(tiny_model_home), "IMAGESMITH_API_KEYS": "k"},
        "serve",
        "--host",
        "192.0.2.1",
        "--port",
        "18407",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        "imagesmith serve: error: host: 192.0.2.1 is not an address of this machine ("
    )
    assert "(--host or IMAGESMITH_HOST)" in done.stderr and "--port" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_environment_setting_is_named_as_set_and_exits_2(tiny_model_home: Path) -> None:
    env = {"IMAGESMITH_DATA_DIR": str(tiny_model_home), "IMAGESMITH_PRECISION": "bf17"}
    for command in (["doctor"], ["generate", "x", "-o", str(tiny_model_home / "never.png")]):
        done = cli_with(env, *command)
        assert done.returncode == 2, done.stderr
        assert (
            "IMAGESMITH_PRECISION: Input should be 'auto', 'bf16'" in done.stderr and "'bf17'" in done.stderr
        )
        assert "Traceback" not in done.stderr


def test_an_output_name_of_another_format_is_refused(tiny_model_home: Path, tmp_path: Path) -> None:
    done = run_cli("generate", "x", "-o", str(tmp_path / "hero.gif"), home=tiny_model_home)
    assert done.returncode == 2
    assert (
        "--output: .gif is not a format imagesmith writes; name the file .png, .jpg or .webp" in done.stderr
    )
    assert not (tmp_path / "hero.gif").exists()


def test_the_server_module_reports_a_bad_setting_like_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGESMITH_DATA_DIR": str(tmp_path), "IMAGESMITH_QUEUE_MAX": "abc"}
    done = subprocess.run(
        [sys.executable, "-m", "imagesmith.api.serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "IMAGESMITH_QUEUE_MAX: Input should be a valid integer" in done.stderr
    assert "Traceback" not in done.stderr


def doctor_beside_its_settings_file(folder: Path) -> subprocess.CompletedProcess[str]:
    """`imagesmith doctor` run in `folder`, which holds the .env it reads."""
    env = {**os.environ, "IMAGESMITH_DATA_DIR": str(folder / "data")}
    return subprocess.run(
        [*CLI, "doctor"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_settings_file_that_is_not_utf8_is_named_without_a_traceback(tmp_path: Path) -> None:
    """A .env saved as UTF-16 (Windows Notepad) came out as python-dotenv's UnicodeDecodeError traceback."""
    (tmp_path / ".env").write_bytes("IMAGESMITH_DEVICE=cpu\n".encode("utf-16"))
    done = doctor_beside_its_settings_file(tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"imagesmith: error: {tmp_path / '.env'} (the settings file) is not UTF-8 text"
    )
    assert "save it as UTF-8" in done.stderr and "Traceback" not in done.stderr


def test_a_settings_file_line_that_cannot_be_read_is_named_not_skipped(tmp_path: Path) -> None:
    """python-dotenv skips such a line with a warning naming no setting: the key on it stayed unset, and
    doctor said Pexels was not configured, exit 0."""
    (tmp_path / ".env").write_text(
        'IMAGESMITH_DEVICE=cpu\nIMAGESMITH_PEXELS_API_KEY="abc123\nnot a setting\n'
    )
    done = doctor_beside_its_settings_file(tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(
        f"imagesmith: error: {tmp_path / '.env'} (the settings file): line 2 (IMAGESMITH_PEXELS_API_KEY), "
        "and 1 more line(s) after it, cannot be read as NAME=value"
    ), done.stderr
    assert "abc123" not in done.stderr and "Traceback" not in done.stderr  # the value may be a secret


def test_doctor_reports_a_plan_the_card_cannot_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp8 asked on a card without fp8 tensor cores: doctor says so in its plan line, no traceback."""
    from imagesmith import cli
    from imagesmith.engine import hardware

    ampere = hardware.DeviceInfo(
        "cuda", name="RTX 3090", capability=(8, 6), total_memory_gib=24, free_memory_gib=23
    )
    monkeypatch.setattr(hardware, "probe_device", lambda requested="auto": ampere)
    monkeypatch.setenv("IMAGESMITH_FP8", "true")
    monkeypatch.setenv("IMAGESMITH_DATA_DIR", str(tmp_path))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "device: cuda:0 (RTX 3090, compute capability 8.6" in out
    assert "plan: ERROR IMAGESMITH_FP8=true needs a GPU with fp8 tensor cores" in out
    assert "data dir " in out and "doctor: " in out  # the checks after the plan ran too


def test_doctors_fa4_check_runs_the_kernel_and_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    """IMAGESMITH_ATTENTION_BACKEND=fa4 where FlashAttention-4 cannot run (here: a torch with no CUDA at all):
    doctor's line runs the same check a start runs, and says what a start would refuse and the fix."""
    from imagesmith import cli

    assert cli._check_fa4_attention("cuda:0") == 1
    out = capsys.readouterr().out
    assert "attention: ERROR FlashAttention-4 failed its check on cuda:0 (" in out
    assert "pip install 'flash-attn-4==" in out and "or set IMAGESMITH_ATTENTION_BACKEND=auto" in out


def test_ctrl_c_during_generate_exits_130_cleanly(tiny_model_home: Path, tmp_path: Path) -> None:
    """The GPU thread must stop its pass before the process exits: it used to abort ('terminate called without
    an active exception', exit 134) because the interpreter shut down under a running pass."""
    import signal
    import time

    out = tmp_path / "never.png"
    # SIGINT's default handler, explicitly: a background job (CI) starts with SIGINT ignored.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from imagesmith.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "IMAGESMITH_DATA_DIR": str(tiny_model_home), "IMAGESMITH_DEVICE": "cpu"}
    args = ["generate", "x", "--model", "tiny", "--width", "512", "--height", "512", "--steps", "150"]
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args, "-o", str(out)], env=env, stderr=subprocess.PIPE, text=False
    )
    assert process.stderr is not None
    seen = b""
    deadline = time.monotonic() + 120
    while b"base:" not in seen and time.monotonic() < deadline:  # the first progress bar: mid-generation
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"base:" in seen, seen.decode(errors="replace")[-2000:]
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    stderr = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, stderr[-2000:]
    assert "imagesmith: interrupted" in stderr and "terminate called" not in stderr
    assert not out.exists()


def test_ctrl_c_that_a_library_turns_into_its_own_error_still_exits_130(tmp_path: Path) -> None:
    """Ctrl-C while torch and diffusers are imported left accelerate half-imported, and diffusers reported it as
    `RuntimeError: Failed to import ...` with two tracebacks (exit 1). Here a command catches the interrupt and
    raises its own error, as that import chain did."""
    code = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from imagesmith import cli

def doctor(args):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt as interrupt:
        raise RuntimeError("Failed to import diffusers.pipelines (a library's own error)") from interrupt
    return 0

cli.run_doctor = doctor
sys.exit(cli.main(["doctor"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().endswith("imagesmith: interrupted")
    assert "Traceback" not in done.stderr


def test_options_the_runs_mode_does_not_use_get_a_note() -> None:
    """--refine-steps with the default ensemble, or --high-noise-frac with --mode none, were ignored without a
    word."""
    from imagesmith import cli
    from imagesmith.schemas import RefineMode

    def notes(*argv: str, mode: RefineMode) -> list[str]:
        return cli.unused_options(cli.build_parser().parse_args(["generate", "x", *argv]), mode)

    assert notes("--refine-steps", "10", mode=RefineMode.ENSEMBLE) == [
        "--refine-steps applies to --mode img2img; this run is ensemble, so it is not used"
    ]
    assert notes("--high-noise-frac", "0.7", "--mode", "none", mode=RefineMode.NONE) == [
        "--high-noise-frac applies to --mode ensemble; this run is none, so it is not used"
    ]
    assert notes("--refine-steps", "10", "--refine-strength", "0.5", mode=RefineMode.IMG2IMG) == []
    assert notes(mode=RefineMode.NONE) == []  # defaults given by no one: nothing to say


def test_generate_to_standard_output_writes_only_the_image_there(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """`-o -` pipes the image (it wrote a file named '-.png'); what people read goes to stderr."""
    command = [
        "generate",
        "a kite",
        "-o",
        "-",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--seed",
        "5",
    ]
    done = tiny_process(tiny_model_home, tmp_path, *command, "--format", "webp", capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    (tmp_path / "piped.webp").write_bytes(done.stdout)
    with Image.open(tmp_path / "piped.webp") as image:
        assert (image.format, image.size) == ("WEBP", (64, 64))
    assert parse_a1111_parameters(read_parameters(tmp_path / "piped.webp") or "")["Seed"] == "5"
    assert b"wrote standard output (seed 5)" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["piped.webp"]  # no '-.webp' beside it


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-images", "2"], "'-' (standard output) takes one image, not --num-images 2"),
        (["--json"], "'-' (standard output) carries the image, so --json cannot go there too"),
    ],
)
def test_generate_to_standard_output_refuses_what_cannot_share_it(
    tiny_model_home: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    done = run_cli("generate", "x", "-o", "-", *extra, home=tiny_model_home)
    assert done.returncode == 2, done.stderr
    assert f"imagesmith generate: error: --output: {message}" in done.stderr
    assert "Traceback" not in done.stderr


def test_dev_stdout_is_standard_output_not_a_file_beside_it(tiny_model_home: Path, tmp_path: Path) -> None:
    """`-o /dev/stdout` into a pipe made /dev/stdout.png (as root), and the summary went down the pipe instead."""
    done = tiny_process(
        tiny_model_home, tmp_path, "generate", "x", "-o", "/dev/stdout", *SMALL_IMAGE, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"\x89PNG\r\n"), done.stdout[:80]  # the image, and nothing else
    assert b"wrote standard output" in done.stderr


def test_generate_to_standard_output_refuses_a_terminal(tiny_model_home: Path, tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        done = tiny_process(
            tiny_model_home, tmp_path, "generate", "x", "-o", "-", stdout=follower, stderr=subprocess.PIPE
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert b"which is a terminal here; redirect it (-o - > image.png)" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_misspelled_setting_is_warned_about_with_the_nearest_name(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """IMAGESMITH_MODLE=tiny (and a typo in .env) were ignored without a word: the server ran unconfigured."""
    (tmp_path / ".env").write_text("IMAGESMITH_QUEUEMAX=5\nIMAGESMITH_PEXELS_API_KEY=\n")
    done = subprocess.run(
        [*CLI, "doctor"],
        env={
            **os.environ,
            **tiny_env(tiny_model_home),
            "IMAGESMITH_MODLE": "sdxl",
            "IMAGESMITH_ZZZ": "secret-value",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # Only the names set here: the shell running the tests may hold IMAGESMITH_ names of its own.
    ours = ("IMAGESMITH_MODLE ", "IMAGESMITH_QUEUEMAX ", "IMAGESMITH_ZZZ ")
    warnings = [
        line
        for line in done.stderr.splitlines()
        if line.startswith(tuple(f"imagesmith: warning: {n}" for n in ours))
    ]
    assert sorted(warnings) == [
        "imagesmith: warning: IMAGESMITH_MODLE (in the environment) is not a setting, so it is ignored; did you "
        "mean IMAGESMITH_MODEL?",
        "imagesmith: warning: IMAGESMITH_QUEUEMAX (in .env (the settings file)) is not a setting, so it is "
        "ignored; did you mean IMAGESMITH_QUEUE_MAX?",
        "imagesmith: warning: IMAGESMITH_ZZZ (in the environment) is not a setting, so it is ignored; the "
        "settings are listed in the README",
    ]
    assert "secret-value" not in done.stderr + done.stdout  # names only, never values


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA GPU: the device is usable")
@pytest.mark.parametrize(
    ("how", "named", "fix"),
    [("option", "--device", "use --device cpu"), ("env", "IMAGESMITH_DEVICE", "set IMAGESMITH_DEVICE=cpu")],
)
def test_serve_on_a_missing_gpu_exits_2_before_starting(
    tiny_model_home: Path, how: str, named: str, fix: str
) -> None:
    """It came up, failed its start with a traceback in the log and stayed running in health 'failed'."""
    env = {"IMAGESMITH_DATA_DIR": str(tiny_model_home), "IMAGESMITH_MODEL": "tiny"}
    if how == "option":
        done = cli_with({**env, "IMAGESMITH_DEVICE": "cpu"}, "serve", "--port", "18419", "--device", "cuda")
    else:
        done = cli_with({**env, "IMAGESMITH_DEVICE": "cuda"}, "serve", "--port", "18419")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"imagesmith serve: error: {named}: device 'cuda' was asked for but torch sees no CUDA GPU"
    ), done.stderr
    assert fix in done.stderr and "Traceback" not in done.stderr and "loading base model" not in done.stderr


def test_generate_to_a_closed_pipe_fails_in_one_line(tiny_model_home: Path, tmp_path: Path) -> None:
    """`... -o - | head -c 0`: the reader is gone; one line and exit 1, no traceback at the interpreter's exit."""
    with subprocess.Popen(
        [
            *CLI,
            "generate",
            "x",
            "-o",
            "-",
            *SMALL_IMAGE,
        ],
        env={**os.environ, **tiny_env(tiny_model_home)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # before anything is written
        errors = process.stderr.read().decode()
        assert process.wait(timeout=300) == 1, errors
    assert "imagesmith generate: cannot write standard output: Broken pipe" in errors
    assert "Traceback" not in errors and "Exception ignored" not in errors


def test_a_file_named_dash_is_still_a_file(tiny_model_home: Path, tmp_path: Path) -> None:
    """Only '-' itself is standard output: './-' names a file, as in any Unix tool (Path made both '-')."""
    done = tiny_process(
        tiny_model_home,
        tmp_path,
        "generate",
        "x",
        "-o",
        "./-",
        *SMALL_IMAGE,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"wrote -.png (seed ") and (tmp_path / "-.png").is_file()


def test_serve_refuses_an_empty_data_dir_option(tiny_model_home: Path) -> None:
    """argparse's Path('') was '.', the folder the server started from."""
    done = run_cli("serve", "--data-dir", "", "--port", "18421", home=tiny_model_home)
    assert done.returncode == 2, done.stderr
    assert (
        "imagesmith serve: error: --data-dir: is empty, which would put the data in whatever folder"
        in done.stderr
    )


def without_unbuffered(env: dict[str, str], unbuffered: bool) -> dict[str, str]:
    cleaned = {name: value for name, value in env.items() if name != "PYTHONUNBUFFERED"}
    return {**cleaned, "PYTHONUNBUFFERED": "1"} if unbuffered else cleaned


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails")
@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("json_output", [False, True], ids=["summary", "json"])
def test_a_standard_output_that_refuses_writes_is_one_line_and_exit_1(
    tiny_model_home: Path, tmp_path: Path, unbuffered: bool, json_output: bool
) -> None:
    """`generate > /dev/full`: an OSError traceback after the image was written, or, with stdout buffered, the
    interpreter's "Exception ignored" at exit and exit code 120."""
    json_flag = ["--json"] if json_output else []
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [
                *CLI,
                "generate",
                "x",
                "-o",
                "a.png",
                *SMALL_IMAGE,
                *json_flag,
            ],
            env=without_unbuffered({**os.environ, **tiny_env(tiny_model_home)}, unbuffered),
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.rstrip().endswith("imagesmith: cannot write standard output: No space left on device")
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert (tmp_path / "a.png").is_file()  # the work itself was done


LARGER_IMAGE = ("--width", "512", "--height", "512", "--steps", "2")


def test_an_image_cut_short_by_its_reader_is_a_failure_even_unbuffered(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """`-o - | head -c 10` with stdout unbuffered: the raw file took the first 64 KiB of the PNG and the rest was
    never written, yet the command said "wrote standard output" and exited 0."""
    with subprocess.Popen(
        # 512x512: a PNG of noise far over a pipe's 64 KiB.
        [*CLI, "generate", "x", "-o", "-", *LARGER_IMAGE],
        env=without_unbuffered({**os.environ, **tiny_env(tiny_model_home)}, unbuffered=True),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.read(10).startswith(b"\x89PNG")
        process.stdout.close()
        errors = process.stderr.read().decode()
        assert process.wait(timeout=300) == 1, errors
    assert "cannot write standard output: Broken pipe" in errors and "wrote standard output" not in errors


def test_an_image_to_a_closed_standard_output_is_refused_before_any_work(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """Started with stdout closed (`-o - >&-`): AttributeError 'NoneType' object has no attribute 'isatty'."""
    done = subprocess.run(
        [*CLI, "generate", "x", "-o", "-", *SMALL_IMAGE],
        env={**os.environ, **tiny_env(tiny_model_home)},
        cwd=tmp_path,
        preexec_fn=lambda: os.close(1),
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "standard output, which is closed here; name a file" in done.stderr and "Traceback" not in done.stderr
    )


def test_an_ensemble_split_the_scheduler_leaves_empty_is_refused_before_the_models_load(
    tiny_model_home: Path,
) -> None:
    """int(10 x 0.95) = 9 base steps passed the request's own check, but DPM++'s timesteps put all 10 above the
    cut: refused after the models loaded, exit 1, naming high_noise_frac and num_inference_steps."""
    done = run_cli(
        "generate", "x", *SMALL_IMAGE[:4], "--steps", "10", "--high-noise-frac", "0.95", "--scheduler", "dpmpp_2m",
        home=tiny_model_home,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.rstrip().endswith(
        "imagesmith generate: error: --high-noise-frac 0.95 with 10 steps of dpmpp_2m gives the base 10 step(s) "
        "and the refiner 0; raise --steps to 20 or more, or move --high-noise-frac away from 0 and 1"
    )
    assert "loading base model" not in done.stderr


def test_an_empty_stage_at_the_most_steps_is_not_told_to_raise_them(tiny_model_home: Path) -> None:
    """--steps is at most 150: "raise --steps" was a fix no one could follow there (a black-box session)."""
    done = run_cli(
        "generate", "x", *SMALL_IMAGE[:4], "--steps", "150", "--high-noise-frac", "0.999", home=tiny_model_home
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.rstrip().endswith(
        "imagesmith generate: error: --high-noise-frac 0.999 with 150 steps of euler gives the base 150 step(s) "
        "and the refiner 0; move --high-noise-frac closer to 0.5"
    )


def test_a_write_that_fails_after_some_images_says_which_were_written(
    tiny_model_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk filled at the second of three images: generate said only that the second failed, and the first,
    a whole file on disk, went unmentioned."""
    import errno

    from imagesmith import cli
    from imagesmith.output_file import write_whole

    writes: list[Path] = []

    def disk_fills_after_one(path: Path, data: bytes) -> None:
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        write_whole(path, data)

    monkeypatch.setattr(cli, "write_whole", disk_fills_after_one)
    monkeypatch.setenv("IMAGESMITH_DATA_DIR", str(tiny_model_home))
    monkeypatch.setenv("IMAGESMITH_MODEL", "tiny")
    monkeypatch.setenv("IMAGESMITH_DEVICE", "cpu")
    # Read from this environment: get_settings keeps the first Settings made in the process (another test's).
    monkeypatch.setattr(cli, "get_settings", Settings)
    target = tmp_path / "m.png"
    code = cli.main(
        [
            "generate",
            "x",
            "--steps",
            "2",
            "--num-images",
            "3",
            "-o",
            str(target),
            "--width",
            "64",
            "--height",
            "64",
        ]
    )
    errors = capsys.readouterr().err
    assert code == 1
    assert f"cannot write {tmp_path / 'm_1.png'}: No space left on device" in errors
    assert f"1 of 3 images written: {tmp_path / 'm_0.png'}" in errors
    assert (tmp_path / "m_0.png").is_file() and not (tmp_path / "m_1.png").exists()


def test_a_stage_bar_stops_at_its_last_step_not_at_the_decode(capsys: pytest.CaptureFixture[str]) -> None:
    """The last denoising stage's bar stayed open until generate returned, so it counted the decode's time."""
    import time
    import types

    from imagesmith.cli import _StageBars

    bars = _StageBars()
    for stage, total in (("base", 2), ("refine", 1)):
        for step in range(1, total + 1):
            bars(types.SimpleNamespace(stage=stage, step=step, total=total, elapsed_s=0.0))
    time.sleep(1.1)  # the decode
    bars.close()
    shown = capsys.readouterr().err
    assert "refine: 100%" in shown and "[00:00<" in shown.split("refine:")[-1], shown  # not [00:01<


def test_the_decode_has_a_bar_of_its_own_that_counts_its_time(capsys: pytest.CaptureFixture[str]) -> None:
    """On a CPU the decode takes tens of seconds; its own bar shows it working, and how long it took."""
    import time
    import types

    from imagesmith.cli import _StageBars

    bars = _StageBars()
    bars(types.SimpleNamespace(stage="base", step=1, total=1, elapsed_s=0.0))
    bars(types.SimpleNamespace(stage="decode", step=0, total=1, elapsed_s=0.0))
    time.sleep(1.1)
    bars(types.SimpleNamespace(stage="decode", step=1, total=1, elapsed_s=1.1))
    shown = capsys.readouterr().err
    assert "decode: 100%" in shown and "[00:01<" in shown.split("decode:")[-1], shown
    assert "pass" in shown.split("decode:")[-1], shown  # one pass, not steps


def test_a_stage_bar_counts_the_time_of_its_first_step(capsys: pytest.CaptureFixture[str]) -> None:
    """A stage is first heard when its first step is done: its bar showed 00:00 and ~14,000 steps/s for a one-step
    stage that took seconds. The bar's clock starts where the stage began (the event before it)."""
    import types

    from imagesmith.cli import _StageBars

    bars = _StageBars()
    bars(types.SimpleNamespace(stage="base", step=1, total=2, elapsed_s=2.0))
    bars(types.SimpleNamespace(stage="base", step=2, total=2, elapsed_s=4.0))
    bars(types.SimpleNamespace(stage="refine", step=1, total=1, elapsed_s=7.0))  # a 3 s step
    shown = capsys.readouterr().err
    base, refine = shown.split("refine:")[0], shown.split("refine:")[-1]
    assert "[00:02<" in base.split("base:")[-1], shown  # its first step; the second took no time here
    assert "[00:03<" in refine and ("3.00s/step" in refine or "0.33step/s" in refine), shown


def test_the_log_lines_of_a_generation_start_lines_of_their_own_between_the_bars(
    tiny_model_home: Path, tmp_path: Path
) -> None:
    """The decode's 'stage decode ...' line is logged while its bar is still open: it landed after the bar's
    text on the same line. Log lines now go above the bars (tqdm's logging redirect)."""
    done = run_cli("generate", "a kite", "-o", str(tmp_path / "k.png"), *SMALL_IMAGE, home=tiny_model_home)
    assert done.returncode == 0, done.stderr
    lines = re.split(r"[\r\n]", done.stderr)
    logged = [line for line in lines if "INFO imagesmith" in line]
    assert any("stage decode" in line for line in logged), done.stderr
    # Each begins with its timestamp: no bar's text before it.
    assert all(line.lstrip().startswith("20") for line in logged), logged
