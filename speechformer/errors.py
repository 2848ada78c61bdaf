"""What a failed command prints: one line for the user's mistakes, a traceback for our bugs.

The rule (docs/reliability.md, "Errors"): a command that fails because of what it was given
(a missing or damaged file, a wrong flag or config value, a full disk, a GPU that is not
there) ends with exactly one line on stderr, ``error: WHAT: reason; what to do``, and exit
status 2, never a traceback. ``speechformer --debug ...`` or ``SPEECHFORMER_DEBUG=1`` prints
the traceback above that line. Anything else is a bug in speechformer: its traceback is
printed (a bug report needs it, and re-running a long job to get it is expensive), then one
``error: internal error: ...`` line, and the exit status is 1.

Which exceptions are the user's (:func:`is_user_error`):

- :class:`UserError`, the shape new messages are written in (``UserError(what, reason, hint)``);
- every ``ValueError``: the toolkit's convention for bad input (``AudioError``, ``ManifestError``,
  ``PrepareError``, ``WhisperImportError``, a config value out of range), and what the standard
  library raises for bad bytes (``json.JSONDecodeError``, ``UnicodeDecodeError``);
- every ``OSError``: a missing file, a permission, a full disk, a file where a folder should be;
- ``FloatingPointError``: training stopped after too many NaN/inf losses (the message says what to do);
- CUDA out of memory, and Lightning's ``MisconfigurationException`` (a trainer setting this
  machine cannot honour, such as ``--trainer.accelerator gpu`` without a GPU).

A ``TypeError``, ``KeyError``, ``IndexError``, ``RuntimeError`` ... is a bug: whatever the user
gave should have been refused earlier, with a one-line message, by the code that reads it
(``transcribe.load_model`` checks a model folder that way; ``ModelConfig.from_dict`` the
config's types).

Standard library only, so ``speechformer --help`` does not import torch.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SPEECHFORMER_DEBUG"
USER_ERROR_STATUS = 2
INTERNAL_ERROR_STATUS = 1
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports it


class UserError(ValueError):
    """A mistake in what the user gave, in the one shape every error line has.

    ``str()`` is ``"{what}: {reason}; {hint}"``: *what* names the file, flag, line or setting,
    *reason* says what is wrong with it, *hint* what to do. A ``ValueError``, so code that
    already handles bad input handles this too.
    """

    def __init__(self, what: object, reason: str, hint: str) -> None:
        self.what, self.reason, self.hint = str(what), reason, hint
        super().__init__(f"{self.what}: {reason}; {hint}")


# what to do about an OSError, by errno; the default is to check the path
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a file of that name is in the way; choose another path",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENOSPC: "free some space and re-run",
    errno.EDQUOT: "free some space and re-run",
    errno.EROFS: "write somewhere else",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "a symbolic link points back at itself; fix or remove it",
}


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks were asked for, and ``argv`` without ``--debug``.

    ``--debug`` is taken anywhere before a ``--`` (``speechformer --debug fit ...`` and
    ``speechformer transcribe ... --debug`` alike), so a Lightning command's own parser
    never sees it; ``SPEECHFORMER_DEBUG=1`` (any value but empty or 0) does the same.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    flagged = DEBUG_FLAG in argv[:end]
    kept = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return flagged or os.environ.get(DEBUG_ENV, "") not in ("", "0"), kept


def is_user_error(err: BaseException) -> bool:
    """The user's mistake (one line) rather than a bug in speechformer (a traceback)."""
    if isinstance(err, (ValueError, OSError, FloatingPointError)):
        return True
    return type(err).__name__ in ("OutOfMemoryError", "MisconfigurationException")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _one_line(text: str) -> str:
    """A message on one line: the lines of a multi-line one joined by spaces."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_error(err: OSError) -> str:
    if err.filename is not None and err.strerror:  # raised by the OS: the path and errno's words
        hint = _OS_HINTS.get(err.errno or 0, "check the path")
        return f"{err.filename}: {err.strerror[0].lower() + err.strerror[1:]}; {hint}"
    if err.strerror and err.errno is not None and len(err.args) == 2:  # OSError(errno, our message)
        return _one_line(err.strerror)
    return _one_line(str(err))


def _manifest_error(problems: Sequence[object], hint: str) -> str:
    """The first problem of a manifest, how many more, where to see them all and what to do:
    fix or remove the lines, or (``hint``, training) skip them."""
    first = problems[0]
    path = getattr(first, "path", "the manifest")
    more = f"{len(problems) - 1} more problem(s); " if len(problems) > 1 else ""
    todo = "fix or remove those lines" + (f", or {hint}" if hint else "")
    return f"{_one_line(str(first))} ({more}`speechformer data validate {path}` lists them all); {todo}"


@dataclass(frozen=True)
class Command:
    """The command reporting an error, for lines its message alone would not complete.

    ``name`` is the WHAT of a message that names nothing (``fit: ...``), ``hint`` the
    what-to-do of one that says nothing to do (default: its ``--help``), ``manifest_hint``
    is added to a bad manifest's line (training can skip bad lines).
    """

    name: str = "speechformer"
    hint: str = ""
    manifest_hint: str = ""

    @property
    def what_to_do(self) -> str:
        return self.hint or f"see `speechformer {self.name} --help`"


_NAMED = re.compile(r"[^\s;][^;]*?: \S")  # "WHAT: reason", WHAT without a semicolon


def shaped(text: str, command: Command = Command()) -> str:
    """``text`` in the ``WHAT: reason; what to do`` shape: a message that names nothing gets the
    command's name, one that says nothing to do gets the command's hint."""
    if not _NAMED.match(text.split("; ", 1)[0]):
        text = f"{command.name}: {text}"
    if "; " not in text:
        text = f"{text}; {command.what_to_do}"
    return text


def describe(err: BaseException, command: Command = Command()) -> str:
    """The error line's text for ``err`` (without ``error: ``): one line, in the rule's shape."""
    return shaped(_text(err, command.manifest_hint), command)


def _text(err: BaseException, manifest_hint: str) -> str:
    problems = getattr(err, "problems", None)  # a ManifestError: its first problem, and a count
    if isinstance(err, ValueError) and problems:
        return _manifest_error(problems, manifest_hint)
    if isinstance(err, OSError):
        return _os_error(err)
    name = type(err).__name__
    if name == "OutOfMemoryError":  # torch's first two sentences: what ran out, and how much was asked for
        said = ". ".join(_first_line(str(err)).split(". ")[:2]).rstrip(".")
        return (f"GPU: out of memory ({said}); give smaller batches (transcribe/evaluate --batch-seconds, "
                "fit --data.max_batch_seconds) or use --device cpu")
    if name == "MisconfigurationException":
        return (f"trainer: {_one_line(str(err))}; check the --trainer.* flags and the trainer: section of the "
                "config (`speechformer fit --help`)")
    return _one_line(str(err)) or name


def report(err: BaseException, debug: bool = False, command: Command = Command()) -> int:
    """Print ``err`` as the rule says and return the exit status."""
    if isinstance(err, KeyboardInterrupt):
        print(f"error: {command.name}: interrupted; re-run the command (with --resume or --ckpt_path last to "
              "keep the finished work)", file=sys.stderr)
        return INTERRUPTED_STATUS
    if is_user_error(err):
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"error: {describe(err, command)}", file=sys.stderr)
        return USER_ERROR_STATUS
    traceback.print_exception(err, file=sys.stderr)
    print(f"error: internal error: {type(err).__name__}: {_first_line(str(err)).replace(';', ',')}; this is a bug "
          "in speechformer, please report it with the traceback above", file=sys.stderr)
    return INTERNAL_ERROR_STATUS


def run_reporting(run: Callable[[], int | None], debug: bool = False, command: Command = Command()) -> int:
    """``run()``'s exit status, or the status :func:`report` gives for what it raised.

    ``SystemExit`` (argparse's usage errors, ``--help``) passes through untouched.
    """
    try:
        return int(run() or 0)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure ends in the rule's line
        return report(err, debug, command)
