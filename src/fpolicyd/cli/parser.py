"""The ``argparse`` parser of every ``fpolicyd`` command: argparse's own, plus a suggestion for a mistyped option
or command (``unknown option --listen-prot (did you mean --listen-port?)``), in the words the settings use for a
mistyped key. Light: argparse and :func:`fpolicyd.errors.did_you_mean` (difflib) only (``fpolicyd healthcheck``
builds it every 30 s)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fpolicyd.errors import did_you_mean

__all__ = ["FpolicydArgumentParser"]


class FpolicydArgumentParser(argparse.ArgumentParser):
    """An unknown option is reported by the (sub)command it was given to, with the closest of that command's
    options; an unknown command with the closest command name. Subparsers are of this class too (argparse makes
    them of their parent's class). Exit 2 as argparse does, one line of error after the usage."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        for word in argv:  # before the command: else argparse first says the command is missing
            if not word.startswith("-") or word == "--":
                break
            name = word.partition("=")[0]
            if not any(known.startswith(name) for known in self._option_string_actions):  # prefixes are allowed
                self.unknown([word])
        ns, extras = self.parse_known_args(argv, namespace)
        if extras:
            self._chosen(ns).unknown(extras)
        return ns

    def _chosen(self, ns: argparse.Namespace) -> FpolicydArgumentParser:
        """The innermost (sub)command parser the arguments chose."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and action.dest != argparse.SUPPRESS:
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                if isinstance(chosen, FpolicydArgumentParser):
                    return chosen._chosen(ns)
        return self

    def unknown(self, extras: Sequence[str]) -> NoReturn:
        """Exit 2 naming the first unknown option (with a suggestion), else the arguments left over."""
        options = [word for word in extras if word.startswith("-") and word != "-"]
        if not options:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        option = options[0].partition("=")[0]
        known = [s for s in self._option_string_actions if s.startswith("--") or len(option) <= 2]
        self.error(f"unknown option {option}{did_you_mean(option, known)}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if isinstance(action, argparse._SubParsersAction) and isinstance(value, str) and value not in action.choices:
            names = list(action.choices)
            hint = did_you_mean(value, names) or f" (choose from {', '.join(names)})"
            raise argparse.ArgumentError(None, f"unknown command {value}{hint}")
        super()._check_value(action, value)
