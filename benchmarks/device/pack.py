"""benchmarks/gpu_suite.sh's stage records, and its results packed into a few files under --out and brought back.

  python -m benchmarks.device.pack record --stages=FILE --name=NAME --status=ok|failed|skipped [--exit=RC]
      [--seconds=S] [--log=LOG] [--note=TEXT]       # one JSON line per stage (the suite calls it)
  python -m benchmarks.device.pack pack --work=DIR --out=DIR   # DIR/* -> gpu_suite.tar.gz + 3 files; prints the table
  python -m benchmarks.device.pack import DIR [--results=benchmarks/RESULTS.md]   # here, with what came back
  python -m benchmarks.device.pack verify DIR [--allow_failed=attention_check]   # DIR comes back whole; stages ok

Why: the device machine sends back only $OUT, at most 8 files no more than 2 folders down, so the suite writes its
many logs to a scratch folder and `pack` leaves exactly these in --out: gpu_suite.tar.gz (every log, JSON file and
plot), section.md (the RESULTS section), stages.jsonl (per stage: status, exit code, seconds, the error text of a
failed stage, the stage's last JSON line) and peer.jsonl (benchmarks.peer's records). `import` appends section.md
to RESULTS.md, puts the plots beside it (the section links them as plots/...), and keeps the JSON lines in
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tarfile

from benchmarks.device.stages import read_stages

OUT_FILES = ("gpu_suite.tar.gz", "section.md", "stages.jsonl", "peer.jsonl")
ERROR_LINES = 15
# The line that names the error (Python's "XError: ...", absl's "E1207 ...", a shell's "...: error: ...").
_ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exit|Interrupt)\b|\berror\b|^E\d{4} ", re.IGNORECASE)


def _last_json(text: str) -> dict | None:
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def error_line(text: str) -> str:
  """The last line of `text` that names an error (else its last line): what a one-line summary should show."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  return next((l for l in reversed(lines) if _ERROR_LINE.search(l)), lines[-1] if lines else "")


def record(stages: str, name: str, status: str, exit_code: int | None = None, seconds: float | None = None,
           log: str = "", note: str = "") -> dict:
  text = ""
  if log and os.path.exists(log):
    with open(log, encoding="utf-8", errors="replace") as f:
      text = f.read()
  rec = {"stage": name, "status": status, "exit": exit_code, "seconds": seconds, "note": note or None,
         "error": "\n".join(text.strip().splitlines()[-ERROR_LINES:]) if status == "failed" else None,
         "error_line": error_line(text)[:500] if status == "failed" else None,
         "result": _last_json(text)}
  with open(stages, "a", encoding="utf-8") as f:
    f.write(json.dumps(rec) + "\n")
  return rec


def table(stages: list[dict]) -> str:
  """The stage table printed last (it lands in the device call's output): what ran, how long, why not."""
  lines = ["| stage | status | s | result or error |", "|---|---|---|---|"]
  for s in stages:
    res = s.get("result") or {}
    if s["status"] == "ok" and "python" in res:  # the versions stage: what the numbers were measured with
      what = ", ".join(f"{k} {res[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                                  "torch", "triton", "grain", "jax_backend") if k in res)
    elif s["status"] == "ok":
      keys = ("images_per_s", "jax_images_per_s", "torch_images_per_s", "torch_compile_images_per_s", "mfu",
              "ratio_vs_compile", "records_per_s", "attention")
      what = ", ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}"
                       for k in keys if res.get(k) is not None)
    else:
      what = f"{s.get('note') or ''}: {s.get('error_line') or ''}"
    seconds = "" if s.get("seconds") is None else f"{s['seconds']:.0f}"
    lines.append(f"| {s['stage']} | {s['status']}{'' if s.get('exit') in (None, 0) else ' (exit %s)' % s['exit']} "
                 f"| {seconds} | {what.strip().replace('|', '/')[:240]} |")
  return "\n".join(lines)


def pack(work: str, out: str) -> list[str]:
  """Leaves exactly OUT_FILES (those that exist) in `out`; returns their paths."""
  os.makedirs(out, exist_ok=True)
  stamp = os.path.basename(os.path.normpath(work))
  # site/ holds the wheels the suite installed (megabytes of packages, not results).
  skip = lambda info: None if info.name.split("/")[1:2] == ["site"] or "__pycache__" in info.name else info
  with tarfile.open(os.path.join(out, OUT_FILES[0]), "w:gz") as tar:
    tar.add(work, arcname=stamp, filter=skip)
  for name in OUT_FILES[1:]:
    if os.path.exists(os.path.join(work, name)):
      shutil.copyfile(os.path.join(work, name), os.path.join(out, name))
  return [os.path.join(out, n) for n in OUT_FILES if os.path.exists(os.path.join(out, n))]


def check_out(out: str, max_files: int = 8, max_mib: int = 16) -> list[str]:
  """What would not come back from the device machine's $OUT (its limits: at most 8 files, 16 MiB each, no more
  than 2 folders down, names of letters, digits, '.', '_' and '-'); [] when all of `out` comes back."""
  problems, files = [], []
  for root, _, names in os.walk(out):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), out)
      files.append(rel)
      if rel.count(os.sep) > 2:
        problems.append(f"{rel}: more than 2 folders down")
      if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.split(os.sep)):
        problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_' and '-'")
      if os.path.getsize(os.path.join(root, name)) > max_mib * 2**20:
        problems.append(f"{rel}: larger than {max_mib} MiB")
  if len(files) > max_files:
    problems.append(f"{len(files)} files, more than {max_files}: {', '.join(sorted(files))}")
  return problems


def import_results(came_back: str, results: str) -> list[str]:
  """Appends came_back/section.md to `results`, extracts the archive's plots/*.png beside it and copies the JSON
  lines to <results dir>/results/gpu_suite_<stamp>_*.jsonl. Returns the files written."""
  from benchmarks import peer_report  # pylint: disable=import-outside-toplevel
  missing = [n for n in ("gpu_suite.tar.gz", "section.md") if not os.path.exists(os.path.join(came_back, n))]
  if missing:
    raise SystemExit(f"{came_back}: no {' or '.join(missing)}; pass the folder the device call's --out wrote "
                     "(the call's files_at, plus the --out path under $OUT).")
  results_dir = os.path.dirname(os.path.abspath(results))
  written = []
  with tarfile.open(os.path.join(came_back, "gpu_suite.tar.gz")) as tar:
    stamp = tar.getnames()[0].split("/")[0]
    for member in tar.getmembers():
      parts = member.name.split("/")
      if member.isfile() and len(parts) == 3 and parts[1] == "plots" and parts[2].endswith(".png"):
        dest = os.path.join(results_dir, "plots", parts[2])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with tar.extractfile(member) as src, open(dest, "wb") as dst:
          shutil.copyfileobj(src, dst)
        written.append(dest)
  for name in ("stages.jsonl", "peer.jsonl"):
    src = os.path.join(came_back, name)
    if os.path.exists(src):
      dest = os.path.join(results_dir, "results", f"gpu_suite_{stamp}_{name}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.copyfile(src, dest)
      written.append(dest)
  with open(os.path.join(came_back, "section.md"), encoding="utf-8") as f:
    peer_report.append(results, f.read())
  return written + [results]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.device.pack", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("record")
  r.add_argument("--stages", required=True)
  r.add_argument("--name", required=True)
  r.add_argument("--status", choices=("ok", "failed", "skipped"), required=True)
  r.add_argument("--exit", type=int, default=None)
  r.add_argument("--seconds", type=float, default=None)
  r.add_argument("--log", default="")
  r.add_argument("--note", default="")
  k = sub.add_parser("pack")
  k.add_argument("--work", required=True)
  k.add_argument("--out", required=True)
  i = sub.add_parser("import")
  i.add_argument("came_back")
  v = sub.add_parser("verify")
  v.add_argument("out")
  v.add_argument("--allow_failed", default="", help="Comma-separated stages that may fail (e.g. attention_check "
                 "on a CPU).")
  i.add_argument("--results", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "RESULTS.md"))
  args = p.parse_args(argv)
  if args.cmd == "record":
    record(args.stages, args.name, args.status, args.exit, args.seconds, args.log, args.note)
  elif args.cmd == "pack":
    for path in pack(args.work, args.out):
      print(f"{os.path.getsize(path) / 1024:9.1f} KiB  {path}")
    section = os.path.join(args.work, "section.md")
    if os.path.exists(section):
      with open(section, encoding="utf-8") as f:
        print("\n" + f.read())
    print(table(read_stages(os.path.join(args.work, "stages.jsonl"))))
  elif args.cmd == "verify":
    problems = check_out(args.out)
    allowed = set(filter(None, args.allow_failed.split(",")))
    stages = read_stages(os.path.join(args.out, "stages.jsonl"))
    if not stages:
      problems.append(f"{args.out}/stages.jsonl: missing or empty")
    problems += [f"stage {s['stage']}: {s['status']}: {s.get('note') or ''} {s.get('error_line') or ''}".strip()
                 for s in stages if s["status"] != "ok" and s["stage"] not in allowed]
    if problems:
      raise SystemExit(f"{args.out}: " + "\n  ".join(["not in the shape the device call returns:"] + problems))
    ok = sum(s["status"] == "ok" for s in stages)
    print(f"{args.out}: {ok} of {len(stages)} stages ok (allowed to fail: {', '.join(sorted(allowed)) or 'none'}); "
          f"every file comes back")
  else:
    for path in import_results(args.came_back, args.results):
      print(path)


if __name__ == "__main__":
  main()
