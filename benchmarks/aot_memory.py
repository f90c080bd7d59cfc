"""The launch.aot memory table of benchmarks/RESULTS.md: MixMAE ViT-B/L/H at batch 4096 on several topologies, with
and without remat. Each row is one `python -m launch.aot` subprocess (cpu:N needs its own XLA_FLAGS); rows are
appended to --out as JSON lines (command, exit code, the report), so an interrupted sweep keeps what it finished.

  python -m benchmarks.aot_memory --topologies=v5p-128,v4-32,v5e-256,cpu:64 --sizes=B,L,H --remat=none,full
  python -m benchmarks.aot_memory --topologies=v5p-128 --sizes=H --remat=full --mesh=data=-1,fsdp=8
  python -m benchmarks.aot_memory --table=runs/aot_memory.jsonl   # the RESULTS.md rows
TPU / GPU topologies need libtpu / jax's CUDA plugin in <venv>/aot-targets/{tpu,gpu} (see launch/aot.py) or importable.
The table's last column is the attention the compiled program holds (reports since issue 20; "-" for older ones).
"""
import json
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_list("topologies", ["v5p-128", "v4-32", "cpu:64"], "launch.aot topologies.")
flags.DEFINE_list("sizes", ["B", "L", "H"], "Encoder sizes (config.model.encoder).")
flags.DEFINE_list("remat", ["none", "full"], "config.model.remat_policy values.")
flags.DEFINE_string("config", "configs/mixmae.py:vit_b", "Config (batch 4096 in vit_b).")
flags.DEFINE_list("extra", ["--config.model.scan_layers=True"], "More launch.aot flags for every row.")
flags.DEFINE_string("mesh", "", "config.mesh for every row, e.g. 'data=-1,fsdp=8' (default: the config's).")
flags.DEFINE_string("out", "runs/aot_memory.jsonl", "JSON lines output (appended).")
flags.DEFINE_integer("timeout_s", 3600, "Per-row timeout.")
flags.DEFINE_list("table", [], "Instead of compiling: print the RESULTS.md rows of these JSON-lines files.")


def table_rows(paths) -> list[str]:
  """Markdown rows (topology, encoder, remat, mesh, peak, params+opt, temp, device memory, fits, compile s,
  attention)."""
  gib, rows = 2**30, []
  for path in paths:
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        rep = row["report"]
        if rep.get("compile_error"):  # the compiler refused: its numbers in the peak / temp columns
          need = re.search(r"temporaries \(([^)]*)\).*available HBM \(([^)]*)\)", rep["compile_error"])
          temp = f"{need.group(1)} needed, {need.group(2)} usable" if need else rep["compile_error"]
          mesh = ",".join(f"{k}={v}" for k, v in rep["mesh"].items())
          rows.append(f"| {row['topology']} ({rep['devices']} x {rep['device_kind']}) | ViT-{row['size']} | "
                      f"{row['remat']} | {mesh} | compiler: out of HBM | "
                      f"{rep['per_device_param_and_opt_bytes'] / gib:.3f} | {temp} | "
                      f"{rep['device_memory_bytes'] / gib:.1f} | False | - | - |")
          continue
        if not rep.get("tasks"):
          rows.append(f"| {row['topology']} | ViT-{row['size']} | {row['remat']} | {row.get('mesh') or '-'} | "
                      f"exit {row['exit']}, no report | | | | | | |")
          continue
        extra = [e for e in row["command"].split() if e.startswith("--config.grad_accum_steps")]
        remat = row["remat"] + "".join(f", {e.split('.', 1)[1]}" for e in extra)
        mesh = ",".join(f"{k}={v}" for k, v in rep["mesh"].items())
        for t in rep["tasks"].values():
          rows.append(f"| {row['topology']} ({rep['devices']} x {rep['device_kind']}) | ViT-{row['size']} | {remat} | "
                      f"{mesh} | {t['per_device_peak_bytes'] / gib:.2f} | "
                      f"{t['per_device_param_and_opt_bytes'] / gib:.3f} | {t['per_device_temp_bytes'] / gib:.2f} | "
                      f"{rep['device_memory_bytes'] / gib:.1f} | {rep['fits']} | {t['compile_s']} | "
                      f"{', '.join(t.get('attention') or ['-'])} |")
  return rows


def main(argv):
  del argv
  F = flags.FLAGS
  if F.table:
    print("\n".join(table_rows(F.table)))
    return
  for topo in F.topologies:
    for size in F.sizes:
      for remat in F.remat:
        cmd = [sys.executable, "-m", "launch.aot", f"--config={F.config}", f"--topology={topo}",
               f"--config.model.encoder={size}", f"--config.model.remat_policy={remat}", *F.extra]
        if F.mesh:
          cmd.append(f"--config.mesh={F.mesh}")
        t0 = time.time()
        try:
          proc = subprocess.run(cmd, capture_output=True, text=True, timeout=F.timeout_s)
          code, lines = proc.returncode, proc.stdout.strip().splitlines()
          report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"stderr": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
          code, report = "timeout", {}
        row = {"command": "python -m launch.aot " + " ".join(cmd[3:]), "exit": code, "mesh": F.mesh,
               "wall_s": round(time.time() - t0, 1), "size": size, "remat": remat, "topology": topo,
               "report": report}
        with open(F.out, "a") as f:
          f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)


if __name__ == "__main__":
  app.run(main)
