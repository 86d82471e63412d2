"""What ``fpolicyd serve`` checks before it opens or binds anything, and all that ``fpolicyd config check`` runs.

One function, :func:`preflight`, called by both, so that a configuration ``config check`` accepts is not refused by
``serve`` for a reason found without the network: the routes file, the sink URIs (of the settings and of the
routes), the TLS certificate, key and CA files, and the directories the daemon writes (each named by the setting
that put it there, with the OS reason). It reads files and file-system metadata; it creates, writes and binds
nothing (``serve`` binds the FPolicy port right after it, before it opens the spool).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fpolicyd.config import Settings
from fpolicyd.errors import ConfigError, settings_refused
from fpolicyd.pipeline.router import SINK_SCHEMES
from fpolicyd.server.processing import ProcessingPlan, plan_processing
from fpolicyd.server.tls import TlsFiles, build_context

__all__ = ["WriteTarget", "directory_problem", "preflight", "sink_problem", "write_targets"]


@dataclass(frozen=True, slots=True)
class WriteTarget:
    """A directory the daemon writes, and how the user named it: a setting (``data_dir``, ``spool_dir``...) and
    its value, or a sink URI."""

    setting: str
    configured: str
    path: Path


def write_targets(settings: Settings, uris: tuple[str, ...]) -> tuple[WriteTarget, ...]:
    """Every directory the daemon writes at start, attributed to the setting the user set (``data_dir`` for what
    defaults under it)."""

    def under_data(own: str, value: Path | None, default: Path) -> WriteTarget:
        if value is not None:
            return WriteTarget(own, str(value), value)
        return WriteTarget("data_dir", str(settings.data_dir), default)

    targets = [
        under_data("spool_dir", settings.spool_dir, settings.effective_spool_dir),
        under_data("dead_letter_dir", settings.dead_letter_dir, settings.effective_dead_letter_dir),
    ]
    if settings.reader_dedup:
        targets.append(under_data("dedup_dir", settings.dedup_dir, settings.effective_dedup_dir))
    for uri in uris:
        scheme, _, target = uri.partition(":")
        if scheme == "jsonl" and target:
            targets.append(WriteTarget(f"sink {uri}", target, Path(os.path.expanduser(target))))
    return tuple(targets)


def directory_problem(path: Path) -> OSError | None:
    """Why the daemon could not create or write ``path`` (None when it can, as far as can be known without
    writing): a component that is a file (named), no permission, a read-only file system. Nothing is created."""
    absolute = Path(os.path.abspath(path))
    deepest = Path(absolute.anchor)
    for probe in (*reversed(absolute.parents), absolute):
        try:
            status = os.stat(probe)
        except FileNotFoundError:
            break  # created from here down, in the deepest directory that exists
        except OSError as exc:
            return exc
        if not stat.S_ISDIR(status.st_mode):
            return OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe))
        deepest = probe
    # root passes access() on any directory, but not on a read-only mount: statvfs says which.
    if os.statvfs(deepest).f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(deepest))
    if not os.access(deepest, os.W_OK | os.X_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(deepest))
    return None


def describe_os_error(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    return f"[{code}] {exc.strerror or exc}"


def sink_problem(uri: str) -> str | None:
    """What is wrong with a sink URI that can be told without the network (None when nothing is)."""
    scheme, sep, target = uri.partition(":")
    if not sep or scheme not in SINK_SCHEMES:
        return f"sink {uri!r}: a sink is one of {', '.join(s + ':' for s in SINK_SCHEMES)}"
    if scheme == "stdout":
        return None
    if not target.strip():
        return f"sink {uri!r}: {scheme} needs a target (a queue URL, bus name or directory)"
    if scheme == "sqs":
        parts = urlsplit(target)
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.path.strip("/") == "":
            return (
                f"sink {uri!r}: {target!r} is not an SQS queue URL "
                "(https://sqs.<region>.amazonaws.com/<account>/<queue>)"
            )
    return None


def aws_default_region() -> str | None:
    """The region the AWS SDK would use without ``aws_region``: AWS_REGION, AWS_DEFAULT_REGION, the profile in
    the AWS config file (read locally, as the sinks' clients do when they are created)."""
    from botocore.session import Session  # noqa: PLC0415 - only with an AWS sink

    region = Session().get_config_variable("region")
    return region if isinstance(region, str) and region else None


def preflight(settings: Settings) -> ProcessingPlan:
    """Every check of the settings that needs neither the network nor a write; ConfigError listing every problem
    found (one line each). Returns the processing plan (routes loaded), which ``serve`` then uses."""
    problems: list[str] = []
    plan: ProcessingPlan | None = None
    try:
        plan = plan_processing(settings)
    except ConfigError as exc:
        problems.append(str(exc))
    uris = plan.uris if plan is not None else settings.effective_sinks
    problems.extend(problem for uri in uris if (problem := sink_problem(uri)) is not None)
    cloud = [uri for uri in uris if uri.partition(":")[0] in ("sqs", "eventbridge")]
    if cloud and not settings.aws_region and aws_default_region() is None:
        problems.append(f"aws_region: needed by sink {cloud[0]!r} (set AWS_REGION, or a region in the AWS config file)")
    tls_files = TlsFiles.from_settings(settings)
    if tls_files is not None:
        try:
            build_context(tls_files)
        except ConfigError as exc:
            problems.append(str(exc))
    reported: set[str] = set()  # one line per setting, and per offending directory or file
    for target in write_targets(settings, uris):
        error = directory_problem(target.path)
        if error is None or target.setting in reported or error.filename in reported:
            continue
        reported.update((target.setting, str(error.filename)))
        problems.append(
            f"{target.setting} {target.configured}: cannot create or write {target.path}: "
            f"{describe_os_error(error)} ({error.filename})"
        )
    if problems:
        raise settings_refused(problems)
    assert plan is not None  # a failed plan is a problem
    return plan
