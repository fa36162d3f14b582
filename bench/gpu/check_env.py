"""Before a window: is every package the service and the benchmark need there, at versions that satisfy each other?

Seconds instead of a wasted loan: it walks the requirements of the service's
top-level packages through everything installed (the machine's packages and
the bundle, which comes first on ``sys.path``), and reports each missing
package and each version that does not meet a requirement, then the versions
the run depends on, against what ``machine.txt`` recorded. Exit status 1 when
something is missing or incompatible; a machine whose versions changed but
still fit is reported and passes.

    python -m bench.gpu.check_env [--expect-cuda]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import sys

from packaging.requirements import InvalidRequirement, Requirement

from bench.gpu.bundle import EXCLUDED, LOCK, ROOT, canonical, lock_entries, machine_packages


def needed() -> list[str]:
    """The service's top-level requirements, less those left out of the bundle on purpose."""
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and canonical(line.split("==")[0]) not in EXCLUDED:
            names.append(canonical(line.split("==")[0]))
    return names


def problems(roots: list[str]) -> list[str]:
    """Missing distributions and unmet version requirements in the closure of ``roots``."""
    found: list[str] = []
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found.append(f"{name} is not installed")
            continue
        for text in dist.requires or []:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra, or another platform's
            dependency = canonical(requirement.name)
            try:
                version = metadata.version(dependency)
            except metadata.PackageNotFoundError:
                found.append(f"{dependency} is not installed ({name} {dist.version} requires {requirement})")
                continue
            if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
                found.append(f"{dependency} {version} does not satisfy {name} {dist.version}: {requirement}")
            pending.append(dependency)
    return sorted(set(found))


def report(expect_cuda: bool) -> int:
    print(f"Python {platform.python_version()} at {sys.executable}")
    pins, _ = machine_packages()
    for name, recorded in pins.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        note = "" if version.split("+")[0] == recorded else f"  (machine.txt records {recorded})"
        print(f"  {name} {version}{note}")
    bundled = lock_entries(LOCK)
    shadowed = [
        f"{name} {metadata.version(name)} (the bundle's is {version})"
        for name, (version, _) in bundled.items()
        if _installed(name) and metadata.version(name) != version
    ]
    print(f"  {len(bundled) - len(shadowed)} of {len(bundled)} bundle packages at the bundle's versions")
    for name, why in EXCLUDED.items():
        print(f"  {name}: {'installed' if _installed(name) else 'not installed'} ({why.split(':')[0]})")
    found = problems(needed()) + [f"not the bundle's version: {line}" for line in shadowed]
    found += _torch(expect_cuda)
    for line in found:
        print(f"PROBLEM: {line}")
    print("environment: OK" if not found else f"environment: {len(found)} problem(s)")
    return 1 if found else 0


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _torch(expect_cuda: bool) -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    device = f", {torch.cuda.get_device_name(0)}" if cuda else ""
    print(f"  torch {torch.__version__}: CUDA {torch.version.cuda}, GPU visible: {cuda}{device}")
    if expect_cuda and not cuda:
        return ["no CUDA GPU is visible to torch"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.check_env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-cuda", action="store_true", help="a GPU must be visible (not for the rehearsal)")
    return report(parser.parse_args(argv).expect_cuda)


if __name__ == "__main__":
    raise SystemExit(main())
