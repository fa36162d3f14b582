"""The wheels the lent GPU machine lacks: resolved for its Python and packages, downloaded, hash-checked, sized.

The machine reaches no network and takes at most 64 MiB with each call, so
everything the service and ``bench/gpu`` need beyond what it has travels as
wheels (cp312, manylinux x86_64, or pure Python) in ``build/gpu-bundle/``:

    python -m bench.gpu.bundle lock                 # bench/gpu/bundle.lock (uv; needs PyPI)
    python -m bench.gpu.bundle download DIR         # DIR: the locked wheels; prints the total
    python -m bench.gpu.bundle download DIR --only bitsandbytes

The lock is the service's requirements resolved for Python 3.12 with the
machine's own versions (``machine.txt``), at our locked versions otherwise,
less what the machine already has and what :data:`EXCLUDED` names. Only the
standard library is imported here: this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MACHINE = HERE / "machine.txt"
LOCK = HERE / "bundle.lock"
BUDGET_MIB = 56
MIB = 1 << 20
PYTHON_VERSION = "3.12"
# pip matches each manylinux tag exactly: name every glibc level a wheel of ours
# may carry (torchao and bitsandbytes ship only 2_24/2_28, pyzmq 2_26/2_28).
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
# Service requirements left out of the bundle, and why; the scenarios that
# need them are skipped with this reason.
EXCLUDED = {
    "bitsandbytes": (
        "41 MiB, which does not fit in the 56 MiB bundle beside the rest: MEMORY_MODE=nf4 and nf4_no_t5 are skipped; "
        "`make gpu-bundle-nf4` puts it alone in build/gpu-bundle-nf4 for a later call on a machine that already "
        "installed the bundle"
    ),
    "boto3": "only IMAGE_STORE=s3 imports it (16 MiB with botocore), and the benchmark keeps images on local disk",
}


def machine_packages(path: Path = MACHINE) -> tuple[dict[str, str], set[str]]:
    """``machine.txt``: the pins read off the machine, and the names of everything else installed there."""
    pins: dict[str, str] = {}
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if version:
            pins[canonical(name)] = version
        else:
            names.add(canonical(name))
    return pins, names | set(pins)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``name: (version, hashes)`` of a hash-pinned requirements file (uv's or pip-compile's output)."""
    entries = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        head = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if head:
            hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", block)
            entries[canonical(head.group(1))] = (head.group(2), hashes)
    return entries


def _uv() -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is needed to resolve the bundle: `make install` puts it in .venv")
    return uv


def _compile(requirements: list[str], *extra: str) -> str:
    """uv's resolution of ``requirements`` for the GPU machine's Python and platform."""
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "in.txt"
        source.write_text("\n".join(requirements) + "\n")
        command = [_uv(), "pip", "compile", str(source), "--quiet", "--python-version", PYTHON_VERSION]
        command += ["--python-platform", "x86_64-manylinux_2_28", "--no-annotate", *extra]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"uv pip compile failed:\n{done.stderr}")
        return done.stdout


def lock(output: Path = LOCK) -> None:
    """Resolve the bundle: the service's requirements with the machine's pins, less what the machine has."""
    pins, installed = machine_packages()
    # What the machine's own packages bring with them, it has: they run there.
    brought = {canonical(line.split("==")[0]) for line in _compile([f"{n}=={v}" for n, v in pins.items()]).split()}
    provided = sorted((brought | set(pins)) & installed)
    ours = lock_entries(ROOT / "requirements.lock")
    wanted = [f"{n}=={v}" for n, v in pins.items()]
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = canonical(line.split("==")[0].strip())
        if line.strip() and not line.startswith("#") and name not in pins and name not in EXCLUDED:
            wanted.append(line.strip())
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        # What the machine does not provide at the version our own lock has.
        constraints.write("".join(f"{n}=={v}\n" for n, (v, _) in ours.items() if n not in provided))
        constraints.flush()
        resolved = _compile(
            wanted,
            "--constraint",
            constraints.name,
            "--generate-hashes",
            "--custom-compile-command",
            "make gpu-lock",
            *(arg for name in provided for arg in ("--no-emit-package", name)),
        )
    has = textwrap.wrap(f"less what the machine has ({', '.join(provided)})", 110)
    header = (
        "# The wheels the lent GPU machine lacks (`make gpu-bundle` downloads them): the service's requirements\n"
        f"# resolved for Python {PYTHON_VERSION} with bench/gpu/machine.txt's pins,\n"
        + "".join(f"# {line}\n" for line in has)
        + f"# and less {', '.join(EXCLUDED)} (see bench/gpu/bundle.py).\n"
    )
    output.write_text(header + resolved)
    print(f"wrote {output}: {len(lock_entries(output))} packages")


def download(directory: Path, only: list[str] | None = None, budget_mib: float = BUDGET_MIB) -> int:
    """The wheels of the bundle lock (or ``only`` these, from requirements.lock) into ``directory``, hash-checked;
    returns their total bytes and fails above the budget."""
    source = ROOT / "requirements.lock" if only else LOCK
    entries = lock_entries(source)
    if only:
        entries = {canonical(name): entries[canonical(name)] for name in only}
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        for name, (version, hashes) in entries.items():
            requirements.write(f"{name}=={version} " + " ".join(f"--hash={h}" for h in hashes) + "\n")
        requirements.flush()
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
        command += [arg for tag in ("cp312", "abi3", "none") for arg in ("--abi", tag)]
        command += [arg for tag in PLATFORMS for arg in ("--platform", tag)]
        command += ["--require-hashes", "-r", requirements.name, "-d", str(directory)]
        subprocess.run(command, check=True)
    wheels = {}
    for path in directory.glob("*.whl"):
        name = canonical(path.name.split("-")[0])
        if name in entries and path.name.split("-")[1] == entries[name][0]:
            wheels[name] = path
        else:
            path.unlink()  # left from an earlier lock
    missing = sorted(set(entries) - set(wheels))
    if missing:
        raise SystemExit(f"no wheel downloaded for {', '.join(missing)}")
    total = sum(path.stat().st_size for path in wheels.values())
    manifest = {
        "python": PYTHON_VERSION,
        "total_bytes": total,
        "wheels": {path.name: path.stat().st_size for path in sorted(wheels.values())},
        "excluded": {} if only else EXCLUDED,
    }
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in sorted(wheels.values(), key=lambda p: p.stat().st_size, reverse=True)[:8]:
        print(f"  {path.stat().st_size / MIB:6.2f} MiB  {path.name}")
    print(f"{directory}: {len(wheels)} wheels, {total / MIB:.1f} MiB in all (budget {budget_mib:g} MiB)")
    if not only:
        for name, why in EXCLUDED.items():
            print(f"  not in the bundle: {name}: {why}")
    if total > budget_mib * MIB:
        raise SystemExit(f"{directory} is {total / MIB:.1f} MiB, over the {budget_mib:g} MiB that may travel")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.bundle", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lock", help=f"write {LOCK.relative_to(ROOT)}")
    fetch = commands.add_parser("download", help="download the locked wheels into DIR")
    fetch.add_argument("directory", type=Path)
    fetch.add_argument("--only", action="append", help="just this package of requirements.lock (repeatable)")
    fetch.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    args = parser.parse_args(argv)
    if args.command == "lock":
        lock()
    else:
        download(args.directory, args.only, args.budget_mib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
