"""The README is the contract with new users: its quick start and its settings table must stay true."""

from __future__ import annotations

import json
import re
from pathlib import Path

from imagesmith.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`IMAGESMITH_([A-Z0-9_]+)`", README))
    missing = [name for name in Settings.model_fields if name.upper() not in documented]
    assert not missing, f"settings missing from the README's table: {missing}"


def test_quick_start_has_exactly_the_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick_start.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile


DOCS = [
    README,
    *(path.read_text() for path in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))),
]


def curl_examples() -> list[tuple[str, str]]:
    """(path, JSON body) of every curl command in the README's and docs' bash blocks that sends a body with -d."""
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(DOCS), re.DOTALL):
        starts = [match.start() for match in re.finditer(r"(?m)^curl\b", block)]
        for number, start in enumerate(starts):
            command = block[start : starts[number + 1] if number + 1 < len(starts) else len(block)]
            body = re.search(r"-d '([^']*)'", command)
            path = re.search(r"localhost:\d+(/[^\s\"'\\]+)", command)
            if body and path:
                examples.append((path.group(1), body.group(1)))
    return examples


def test_every_curl_example_sends_a_body_its_route_accepts() -> None:
    """Each example's JSON passes the validation of the route it is sent to (what answers 422 otherwise). The
    README's /v1/jobs example sent the seed API's use_generation and use_pexels, which that route refuses."""
    from imagesmith.api.a1111_mapping import Txt2ImgRequest
    from imagesmith.api.jobs import JobCreate
    from imagesmith.api.media import ImageGenerationRequest
    from imagesmith.api.openai_mapping import OpenAIImageRequest

    models = {
        "/v1/jobs": JobCreate,
        "/api/media/generate-image": ImageGenerationRequest,
        "/v1/images/generations": OpenAIImageRequest,
        "/sdapi/v1/txt2img": Txt2ImgRequest,
    }
    examples = curl_examples()
    assert {path for path, _ in examples} == set(models), examples
    for path, body in examples:
        models[path].model_validate_json(body)
        # Three of the routes accept unknown fields (as the seed's and the A1111/OpenAI clients' bodies need),
        # so validation alone would pass a misspelled field that the server then ignores.
        known = set(models[path].model_fields) | {
            field.alias for field in models[path].model_fields.values() if field.alias
        }
        misspelled = set(json.loads(body)) - known
        assert not misspelled, f"{path}: the example sends {sorted(misspelled)}, which the route ignores"


def test_the_cli_summary_names_every_option() -> None:
    """The README's CLI block lists every option of generate, doctor, bench and serve (search's are in
    docs/pexels.md), by one of its names, so an option added to a command cannot go unmentioned."""
    from imagesmith.cli import build_parser

    block = README.split("### CLI", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    pexels = (Path(__file__).resolve().parents[1] / "docs" / "pexels.md").read_text()
    commands = next(action.choices for action in build_parser()._actions if isinstance(action.choices, dict))
    # Each command's own lines: from "imagesmith COMMAND" to the next command.
    usage = dict(re.findall(r"(?ms)^imagesmith (\w+)(.*?)(?=^imagesmith |\Z)", block))
    for command, parser in commands.items():
        text = pexels if command == "search" else usage[command]
        missing = [
            action.option_strings
            for action in parser._actions
            if action.option_strings
            and "--help" not in action.option_strings
            and not any(re.search(rf"(?<![\w-]){name}(?![\w-])", text) for name in action.option_strings)
        ]
        assert not missing, (
            f"imagesmith {command}: {missing} not in the README's CLI block (or docs/pexels.md)"
        )
