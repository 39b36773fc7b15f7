"""Every flag of every subcommand says what it does (nanochat documents every flag)."""

import argparse

from poegpt.cli import build_parser


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_subcommand_has_help():
    missing, seen = [], 0
    for name, sub in subparsers(build_parser()):
        for nested_name, nested in [(name, sub), *((f"{name} {n}", p) for n, p in subparsers(sub))]:
            for action in nested._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                seen += 1
                if not (action.help or "").strip():
                    missing.append(f"{nested_name} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 100 and not missing, f"options without help: {missing}"
