"""Starts N local run.py workers on 127.0.0.1 (MultiWorkerMirroredStrategy) for trying out
multi-worker training on one machine:

  python scripts/launch_workers.py --num_workers=2 -- --strategy=multi_worker \
      --flagfile=flags/fashion_mnist_pretrain.cfg --model_dir=runs/mw

Every worker gets a TF_CONFIG naming all workers (free loopback ports) and its own index;
worker 0 is the chief. Output lines are forwarded with a "[worker i] " prefix. Exits with
the first non-zero exit code of a worker (the others are then stopped), else 0.
On real clusters, start one run.py per host with TF_CONFIG yourself (docs/DISTRIBUTED.md).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n):
  """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
  sockets = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_configs(ports):
  workers = [f"127.0.0.1:{p}" for p in ports]
  return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
          for i in range(len(ports))]


def _forward(stream, prefix, out, lock):
  for line in iter(stream.readline, ""):
    with lock:
      out.write(prefix + line)
      out.flush()
  stream.close()


def launch(num_workers, args, python=sys.executable, script=None, env=None, timeout=None,
           out=sys.stdout):
  """Runs `python script args` as num_workers workers; returns the exit code (see above)."""
  script = script or os.path.join(ROOT, "run.py")
  base_env = dict(os.environ if env is None else env)
  base_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, base_env.get("PYTHONPATH", "")) if p)
  lock = threading.Lock()
  procs, threads = [], []
  for i, config in enumerate(tf_configs(free_ports(num_workers))):
    worker_env = dict(base_env, TF_CONFIG=config)
    proc = subprocess.Popen([python, script, *args], cwd=ROOT, env=worker_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    procs.append(proc)
    thread = threading.Thread(target=_forward, args=(proc.stdout, f"[worker {i}] ", out, lock),
                              daemon=True)
    thread.start()
    threads.append(thread)

  def stop_all():
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
    deadline = time.time() + 10
    for p in procs:
      try:
        p.wait(timeout=max(0.1, deadline - time.time()))
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  start = time.time()
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        # A worker that died leaves the others blocked in collectives: stop them.
        i, code = failed[0]
        with lock:
          out.write(f"launch_workers: worker {i} exited with code {code}; stopping the others\n")
        stop_all()
        break
      if all(c == 0 for c in codes):
        break
      if timeout and time.time() - start > timeout:
        with lock:
          out.write(f"launch_workers: timed out after {timeout:.0f} s; stopping the workers\n")
        stop_all()
        code = 124
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    stop_all()
    code = 130
  for t in threads:
    t.join(timeout=5)
  out.flush()
  return code


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
  else:
    own, rest = argv, []
  parser = argparse.ArgumentParser(
      description="Start N local run.py workers with TF_CONFIG on 127.0.0.1.",
      usage="launch_workers.py [--num_workers=N] [--timeout=S] -- <run.py flags>")
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=0,
                      help="Stop all workers after this many seconds (0: no limit).")
  parser.add_argument("--script", default=None, help="Script to run (default: run.py).")
  opts = parser.parse_args(own)
  if opts.num_workers < 1:
    parser.error(f"--num_workers must be >= 1, got {opts.num_workers}")
  return launch(opts.num_workers, rest, script=opts.script, timeout=opts.timeout or None)


if __name__ == "__main__":
  sys.exit(main())
