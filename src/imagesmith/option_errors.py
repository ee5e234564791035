"""A request's field errors said in the CLI's words: the option the user typed, not the request field behind it.

One place for `imagesmith generate` and `imagesmith bench`, which each build a GenerationRequest from their
options and map its fields back to them (cli.py imports bench.py, so the helper cannot live in either).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from pydantic import ValidationError

from imagesmith.schemas import field_errors, in_callers_names

USAGE_ERROR = 2  # argparse's exit status for bad usage


def option_for(field: str, option_for_field: Mapping[str, str]) -> str:
    """The option that sets `field`: the command's own mapping, else the field's name as an option."""
    return option_for_field.get(field, "--" + field.replace("_", "-"))


def report_option_errors(command: str, invalid: ValidationError, option_for_field: Mapping[str, str]) -> int:
    """Print each field error as `imagesmith COMMAND: error: --option: message` on stderr; the exit status."""
    for item in field_errors(invalid):
        option = option_for(item.field, option_for_field)
        message = in_callers_names(item.message, option_for_field)  # only fields this command has options for
        # "--width: --width must be ..." said the option twice where the message starts with the field's name.
        for name in (option, item.field):
            message = message.removeprefix(f"{name} ")
        print(f"imagesmith {command}: error: {option}: {message}", file=sys.stderr)
    return USAGE_ERROR
