"""What a failed checkpoint read means, from the exception chain's types and status codes (not its wording).

Orbax wraps storage errors: a tensorstore read failure surfaces as a bare `Exception("Encountered error while reading
array index ...")` whose status (ABORTED, PERMISSION_DENIED, DATA_LOSS, ...) is only in `__cause__`. `classify`
walks `__cause__` / `__context__` and judges each link by:
  * tensorstore / absl status codes, the `CODE: ` prefix tensorstore gives its errors, and the HTTP status it
    attaches (`[http_response_code='503']`);
  * gcsfs's `HttpError.code`, and its 403 (a plain `OSError("Forbidden: <path> ...")`);
  * Python's exception types (PermissionError, ConnectionError, TimeoutError, aiohttp's ClientError, JSONDecodeError).

Kinds, strongest first (a chain with several kinds takes the strongest):
  ACCESS     permission / authentication / missing bucket: fix credentials or the path; never retried
  TRANSIENT  an outage: 429/5xx beyond the client's retries, ABORTED, UNAVAILABLE, a cut connection, a timeout
  UNKNOWN    anything else (a host's MemoryError, a library upgrade's TypeError): not evidence about the files
  DAMAGE     proven damage: DATA_LOSS (a checksum), a truncated object (OUT_OF_RANGE, a truncated zstd stream), an
             undecodable JSON file, a missing file of a committed step, a failed value check (`CheckpointDamage`)
"""
from __future__ import annotations

import errno
import json
import re

ACCESS, TRANSIENT, UNKNOWN, DAMAGE = "access", "transient", "unknown", "damage"
_RANK = {ACCESS: 3, TRANSIENT: 2, UNKNOWN: 1, DAMAGE: 0}


class CheckpointDamage(ValueError):
  """A checkpoint's files were read but what they hold is wrong (value fingerprints, NaN, a step number)."""


_STATUS = re.compile(r"^([A-Z][A-Z_]+): ")
_HTTP = re.compile(r"http_response_code='(\d+)'")
_STATUS_KINDS = {
    "PERMISSION_DENIED": ACCESS, "UNAUTHENTICATED": ACCESS, "NOT_FOUND": ACCESS,
    "ABORTED": TRANSIENT, "UNAVAILABLE": TRANSIENT, "DEADLINE_EXCEEDED": TRANSIENT, "RESOURCE_EXHAUSTED": TRANSIENT,
    "CANCELLED": TRANSIENT,
    "DATA_LOSS": DAMAGE, "OUT_OF_RANGE": DAMAGE, "FAILED_PRECONDITION": DAMAGE,
}
_ERRNO_KINDS = {errno.EACCES: ACCESS, errno.EPERM: ACCESS, errno.ETIMEDOUT: TRANSIENT, errno.ECONNRESET: TRANSIENT,
                errno.ECONNREFUSED: TRANSIENT, errno.EAGAIN: TRANSIENT}


def http_kind(code: int) -> str | None:
  if code in (401, 403, 404):
    return ACCESS
  if code in (408, 429) or 500 <= code < 600:
    return TRANSIENT
  return None


def chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes / contexts, outermost first, each once."""
  out, todo = [], [error]
  while todo:
    e = todo.pop(0)
    if e is None or any(e is seen for seen in out):
      continue
    out.append(e)
    todo += [e.__cause__, e.__context__]
  return out


def _kind(e: BaseException) -> str | None:
  """The verdict of one link of the chain, None when it says nothing."""
  if isinstance(e, CheckpointDamage):
    return DAMAGE
  if isinstance(e, PermissionError):
    return ACCESS
  if isinstance(e, (ConnectionError, TimeoutError)):
    return TRANSIENT
  if isinstance(e, AssertionError) and "sync_global_devices" in str(e):
    return TRANSIENT  # processes out of step in Orbax's barriers (another failed first): says nothing of the files
  names = {f"{c.__module__}.{c.__name__}" for c in type(e).__mro__}
  if any(n.startswith(("aiohttp.", "requests.exceptions.", "asyncio.exceptions.TimeoutError")) for n in names):
    return TRANSIENT  # gcsfs's transport errors (aiohttp), google-auth's (requests), asyncio timeouts
  code = getattr(e, "code", None)
  if "gcsfs.retry.HttpError" in names and isinstance(code, int):
    return http_kind(code)
  if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
    return DAMAGE  # a committed step's file is missing, cut short or garbled
  if isinstance(e, OSError):
    if e.errno in _ERRNO_KINDS:
      return _ERRNO_KINDS[e.errno]
    if e.errno is None and str(e).startswith("Forbidden: "):  # gcsfs's form of an HTTP 403
      return ACCESS
  text = str(e)
  status = _STATUS.match(text)
  if status and status.group(1) in _STATUS_KINDS:
    http = _HTTP.search(text)
    from_http = http_kind(int(http.group(1))) if http else None
    return from_http if from_http == TRANSIENT else _STATUS_KINDS[status.group(1)]
  return None


def classify(error: BaseException) -> str:
  """ACCESS, TRANSIENT, UNKNOWN or DAMAGE (module docstring): the strongest verdict along the chain."""
  kinds = [k for k in (_kind(e) for e in chain(error)) if k is not None]
  return max(kinds, key=_RANK.__getitem__) if kinds else UNKNOWN


def describe(error: BaseException) -> str:
  """One line: the outer error, and the innermost cause when it differs (where the status usually is)."""
  def one(e):
    text = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
  links = chain(error)
  root = links[-1]
  return one(error) if root is error else f"{one(error)} <- {one(root)}"
