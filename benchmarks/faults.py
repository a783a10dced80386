"""Fault injection for `dmdcopy distill`: kills, corrupt checkpoints, two writers, bad inputs.

Usage (as recorded in docs/reliability.md; about 5 minutes on 2 cores)::

    python benchmarks/faults.py [--kills 10] [--corruptions 3] [--races 5]

Every trial runs the real command line in subprocesses on a small exact-teacher run (the gmm2d
example, 60 generator steps, a checkpoint every 10) and compares the end result with an
uninterrupted run, tensor by tensor:

- kills: SIGKILL at a random moment (up to three times per trial), then `--resume` until done;
  the exported student must equal the uninterrupted run's bit for bit;
- corruptions: the newest checkpoint zero-filled past its header, bit-flipped or truncated, then
  `--resume` with a longer `num_steps`: the run must report the damage, fall back to the newest
  valid checkpoint and end equal to an uninterrupted run of that length;
- races: two fresh runs started at once in one directory: exactly one may write;
- bad inputs: garbage values in the TOML: each must end in one line of error, no traceback.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = """out_dir = "{out}"
device = "cpu"

[teacher]
kind = "gmm"
means = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
stds = [0.1, 0.1, 0.1, 0.1]

[student]
init = "mlp"
sigmas = [80.0]
hidden = 64
depth = 2

[fake_score]
init = "mlp"
hidden = 64
depth = 2

[distill]
num_steps = {steps}
batch_size = 128
generator_lr = 1e-3
fake_score_lr = 1e-3
log_every = 10
checkpoint_every = 10
"""


def _config(tmp: Path, name: str, out: Path, steps: int = 60, **override: str) -> Path:
    text = CONFIG.format(out=out.as_posix(), steps=steps)
    for key, value in override.items():
        lines = [f"{key} = {value}" if line.split(" = ")[0] == key else line for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def _run(config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dmdcopy", "distill", str(config), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def kills(tmp: Path, trials: int, rng: random.Random) -> str:
    ref = _config(tmp, "ref", tmp / "ref")
    t0 = time.perf_counter()
    assert _run(ref).returncode == 0
    length = time.perf_counter() - t0
    exact = killed = 0
    for trial in range(trials):
        cfg = _config(tmp, f"kill{trial}", tmp / f"kill{trial}")
        first = True
        for _ in range(3):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            args = [sys.executable, "-m", "dmdcopy", "distill", str(cfg), "--no-progress"]
            proc = subprocess.Popen(args + ([] if first else ["--resume"]), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first = False
            time.sleep(rng.uniform(0.3, length))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait()
        done = _run(cfg, "--resume")
        if done.returncode == 0 and _same(tmp / "ref" / "student.safetensors",
                                          tmp / f"kill{trial}" / "student.safetensors"):
            exact += 1
    return f"kills: {trials} trials, {killed} SIGKILLs, {exact}/{trials} resumed bit-exact"


def corruptions(tmp: Path, trials: int) -> str:
    ref = _config(tmp, "ref80", tmp / "ref80", steps=80)
    assert _run(ref).returncode == 0
    ok = 0
    kinds = ["zero-filled", "bit-flipped", "truncated"]
    for trial in range(trials):
        kind = kinds[trial % len(kinds)]
        out = tmp / f"corrupt{trial}"
        assert _run(_config(tmp, f"c{trial}", out, steps=60)).returncode == 0
        newest = sorted(out.glob("checkpoint-*.safetensors"))[-1]
        data = bytearray(newest.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        if kind == "zero-filled":
            data[header:] = bytes(len(data) - header)
        elif kind == "bit-flipped":
            data[header + (len(data) - header) // 2] ^= 0x10
        else:
            data = data[: header + (len(data) - header) // 2]
        newest.write_bytes(bytes(data))
        done = _run(_config(tmp, f"c{trial}", out, steps=80), "--resume")
        reported = "corrupt" in done.stderr.lower() or "damaged" in done.stderr.lower() \
            or "skipp" in done.stderr.lower()
        if done.returncode == 0 and reported and _same(tmp / "ref80" / "student.safetensors",
                                                        out / "student.safetensors"):
            ok += 1
    return (f"corruptions: {trials} trials ({', '.join(kinds)}), {ok}/{trials} reported, fell back to the "
            f"newest valid checkpoint and ended bit-exact")


def races(tmp: Path, trials: int) -> str:
    one_writer = 0
    for trial in range(trials):
        out = tmp / f"race{trial}"
        cfgs = [_config(tmp, f"race{trial}_{i}", out) for i in range(2)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "dmdcopy", "distill", str(c), "--no-progress"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for c in cfgs]
        codes = [p.wait(timeout=600) for p in procs]
        errors = [p.stderr.read() for p in procs]
        if sorted(codes) == [0, 1] and "Traceback" not in "".join(errors):
            one_writer += 1
    return (f"races: {trials} trials of two writers in one directory, {one_writer}/{trials} with exactly "
            "one writer")


BAD = {
    "batch_size": "10000000000", "hidden": "-5", "num_steps": '"many"', "out_dir": "5",
    "device": '"cuda"' if not torch.cuda.is_available() else '"cuda:99"', "generator_lr": "-1.0",
    "stds": "[0.1]", "means": "[[1.0, 0.0], [0.0]]", "sigmas": "[-80.0]", "depth": "0",
    "conditional": '"false"',
}


def bad_inputs(tmp: Path) -> str:
    clean = 0
    failures = []
    for key, value in BAD.items():
        cfg = _config(tmp, f"bad_{key}", tmp / f"bad_{key}", **{key: value})
        if key == "conditional":  # a key the example does not have: append it to [teacher]
            text = cfg.read_text().replace('kind = "gmm"', f'kind = "gmm"\nconditional = {value}')
            cfg.write_text(text)
        r = _run(cfg, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        if r.returncode not in (0,) and len(lines) == 1 and "Traceback" not in r.stderr:
            clean += 1
        else:
            failures.append(f"{key} = {value} (rc {r.returncode}: {lines[-1][:80] if lines else ''})")
    for name, content in (("directory", None), ("binary", b"\x00\xff" * 100)):
        path = tmp / f"bad_{name}.toml"
        if content is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(content)
        r = _run(path, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        if r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr:
            clean += 1
        else:
            failures.append(f"config is a {name} (rc {r.returncode})")
    total = len(BAD) + 2
    detail = ("; not clean: " + "; ".join(failures)) if failures else ""
    return f"bad inputs: {clean}/{total} ended in one line of error, no traceback{detail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--corruptions", type=int, default=3)
    p.add_argument("--races", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["kills", "corruptions", "races", "bad"],
                   choices=["kills", "corruptions", "races", "bad"])
    args = p.parse_args()
    rng = random.Random(args.seed)
    parts = {"kills": lambda tmp: kills(tmp, args.kills, rng),
             "corruptions": lambda tmp: corruptions(tmp, args.corruptions),
             "races": lambda tmp: races(tmp, args.races), "bad": bad_inputs}
    with tempfile.TemporaryDirectory(prefix="dmdcopy-faults-") as tmp:
        for name in args.parts:
            print(parts[name](Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
