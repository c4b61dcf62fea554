"""`keychain`: operate the keychain table from a shell.

Exit codes: 0 success (for `get`: a hit), 3 `get` miss (absent, expired or invalidated), 1 error, 2 usage.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import sys
from typing import Any, Awaitable, Callable

import click
from .errors import ConfigurationError, InvalidReference, KeychainError
from .invalidation import Selection
from .logs import configure_logging
from .model import storable_text
from .refs import SecretRef
from .settings import extension_variable_names, load_settings, unknown_variables
from .sources import SecretManagerSource
from .store import Keychain

EXIT_MISS = 3


def run(action: Callable[[Keychain], Awaitable[Any]], *, with_source: bool = False) -> Any:
    """Open the keychain from the environment, run one action, close; errors become a message and exit 1."""

    async def main() -> Any:
        settings = load_settings()
        source = SecretManagerSource(settings) if with_source else None
        async with Keychain(settings, source=source) as keychain:
            return await action(keychain)

    return run_plain(main())


def run_plain(action: Awaitable[Any]) -> Any:
    """Run one coroutine; errors become a message and exit 1."""
    try:
        return asyncio.run(action)
    except KeychainError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


EXECUTION_ID = click.IntRange(min=1, max=2**63 - 1)  # workflow engines' ids: positive 64-bit integers


def credential_name(_ctx: click.Context, _param: click.Parameter, name: str | None) -> str | None:
    """A name the table can hold (a usage error otherwise, before any database round trip)."""
    if name is None:
        return None
    try:
        return storable_text(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def scope_options(command: Callable) -> Callable:
    options = [
        click.option("--execution-id", type=EXECUTION_ID, help="Execution scope: the execution's id."),
        click.option("--global", "global_scope", is_flag=True, help="Global scope, shared by every execution."),
        click.option("--session", "session_id", callback=credential_name, help="Session scope: the session's id."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def scope_kwargs(execution_id: int | None, global_scope: bool, session_id: str | None) -> dict[str, Any]:
    given = [x for x in (execution_id is not None, global_scope, session_id is not None) if x]
    if len(given) != 1:
        raise click.UsageError("give exactly one scope: --execution-id N, --global or --session ID")
    return {"execution_id": execution_id, "session_id": session_id}


def parse_json(_ctx: click.Context, _param: click.Parameter, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc.msg} at position {exc.pos})") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at KEYCHAIN_LOG_LEVEL instead of warnings only.")
def main(verbose: bool) -> None:
    """Operate the credential keychain (configured by KEYCHAIN_DSN, KEYCHAIN_KEYS, ...)."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    configure_logging(settings)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    for message in unknown_variables(os.environ, also_known=extension_variable_names()):  # a typo is not silent
        click.echo(f"warning: {message}", err=True)


@main.command()
def migrate() -> None:
    """Create or upgrade the keychain schema (safe to run from several processes at once)."""
    applied = run(lambda kc: kc.migrate())
    click.echo(json.dumps({"applied": applied}))


@main.command()
@click.argument("name", callback=credential_name)
@click.option("--value", help="The value, as JSON (it shows in the process list and the shell's history: prefer "
              "--value-file for a real secret).")
@click.option("--value-file", type=click.File("r", encoding="utf-8"),
              help="Read the value, as JSON, from this file (`-`: standard input).")
@click.option("--raw", is_flag=True, help="With --value-file: the file's text is the value (a string; one trailing "
              "newline removed), not JSON.")
@scope_options
@click.option("--ttl", type=click.IntRange(min=1), help="Seconds until the entry expires.")
def put(name: str, value: str | None, value_file: Any, raw: bool, execution_id: int | None, global_scope: bool,
        session_id: str | None, ttl: int | None) -> None:
    """Store one entry, encrypted. The value comes from --value or --value-file (one of them)."""
    if (value is None) == (value_file is None):
        raise click.UsageError("give the value with exactly one of --value JSON or --value-file FILE")
    if raw and value_file is None:
        raise click.UsageError("--raw goes with --value-file")
    try:
        text = value if value is not None else value_file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read it ({type(exc).__name__})", param_hint="--value-file") from None
    if raw:
        parsed: Any = text[:-1] if text.endswith("\n") else text
    else:
        parsed = parse_json(None, None, text)  # type: ignore[arg-type]
    scope = scope_kwargs(execution_id, global_scope, session_id)
    run(lambda kc: kc.put(name, parsed, ttl_seconds=ttl, **scope))


@main.command()
@click.argument("name", callback=credential_name)
@scope_options
@click.option("--fetch", "ref", help="On a miss, read through Secret Manager from this reference.")
def get(name: str, execution_id: int | None, global_scope: bool, session_id: str | None, ref: str | None) -> None:
    """Print one entry's value as JSON (exit 3 on a miss)."""
    scope = scope_kwargs(execution_id, global_scope, session_id)
    if ref is None:
        lookup = run(lambda kc: kc.get(name, **scope))
    else:
        lookup = run(lambda kc: kc.get_or_fetch(name, ref, **scope), with_source=True)
    if not lookup:
        click.echo(f"miss: {name} ({lookup.outcome})", err=True)
        sys.exit(EXIT_MISS)
    click.echo(json.dumps(lookup.value))


@main.command()
@click.option("--credential", callback=credential_name, help="Every scope's entry of this credential name.")
@click.option("--execution-id", type=EXECUTION_ID, help="Every entry of this execution.")
@click.option("--secret", help="Every entry holding any version of this secret (projects/P/secrets/S, or a regional "
              "projects/P/locations/L/secrets/S), or the one version a pinned reference names (.../versions/N).")
@click.option("--all", "everything", is_flag=True, help="Every entry.")
def invalidate(credential: str | None, execution_id: int | None, secret: str | None, everything: bool) -> None:
    """Stop serving entries at once (a running worker refreshes them; otherwise they are read through or swept)."""
    if sum(x is not None for x in (credential, execution_id, secret)) + everything != 1:
        raise click.UsageError("give exactly one of --credential, --execution-id, --secret, --all")
    if secret is not None:
        try:
            SecretRef.parse(secret)
        except InvalidReference as exc:
            raise click.BadParameter(str(exc), param_hint="--secret") from None
    selection = Selection.of(credential=credential, execution_id=execution_id, secret=secret, everything=everything)
    everywhere = invalidation_path()
    if everywhere is None:  # the library alone: its own table is every store there is
        count = run(lambda kc: kc.maintenance.invalidate(selection))
    else:
        count = run_plain(everywhere(selection))
    click.echo(json.dumps({"invalidated": count or 0}))


def invalidation_path() -> Callable[[Selection], Awaitable[int]] | None:
    """A program that keeps copies of the keychain's secrets in other stores (the stream worker's targets) registers
    its invalidation under the `keychain.invalidation` entry point: with it installed, `keychain invalidate` takes
    that one path, which reaches every store in one transaction. The library names no such store itself."""
    for entry in importlib.metadata.entry_points(group="keychain.invalidation"):
        return entry.load()
    return None


@main.command()
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per delete statement.")
def sweep(batch_size: int | None) -> None:
    """Delete expired entries in bounded batches."""
    click.echo(json.dumps({"swept": run(lambda kc: kc.maintenance.sweep(batch_size))}))


@main.command()
def stats() -> None:
    """Counts of entries by scope and state, and hit figures. Never values."""
    rows = run(lambda kc: kc.maintenance.stats())
    total = sum(r["rows"] for r in rows)
    read = sum(r["read_rows"] for r in rows)
    click.echo(json.dumps({
        "rows": total,
        "hits": sum(r["hits"] for r in rows),
        "rows_read_at_least_once": read,
        "by_scope_and_state": rows,
    }))


@main.command()
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per transaction.")
def rekey(batch_size: int | None) -> None:
    """Re-encrypt every entry under the active (first) key of KEYCHAIN_KEYS, online."""
    done, failed = run(lambda kc: kc.maintenance.rekey(batch_size))
    click.echo(json.dumps({"rekeyed": done, "undecryptable": failed}))
    if failed:
        sys.exit(1)


@main.command()
@click.option("--kid", default="k1", show_default=True, help="Key id.")
def keygen(kid: str) -> None:
    """Print a new random key, `kid:base64`, to put first in KEYCHAIN_KEYS."""
    from .crypto import KeyRing

    click.echo(KeyRing.generate_spec(kid))
