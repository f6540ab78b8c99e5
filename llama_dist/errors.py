"""The one exception type for expected user mistakes: printed as one line, no traceback."""

import re


class UserError(Exception):
    """A mistake in input, config or environment that the user can fix; the message says how."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_error_reason(err: BaseException) -> str:
    """One line on why torch.load refused a file: its errors run to paragraphs with colour codes."""
    text = _ANSI.sub("", str(err))
    refused = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if refused:  # the file pickles objects, which weights_only=True will not construct
        return (f"it holds more than tensors ({refused.group(1).split('. ')[0].strip()}), and checkpoints are "
                f"loaded with weights_only=True, which runs no code")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:200]}"
