"""What the GPU check needs beside the tree, checked here before a lent GPU's minutes are spent (``make gpu-prep``).

``make gpu-prep`` builds ``.whl/`` (DeepSpeed and its pure-Python needs, which the GPU machine lacks) and
``.ffcv_carry/`` (FFCV for its Python 3.12), then runs this: it checks that both are there, that the three reference
files in ``.reference/dino/`` are byte for byte those of facebookresearch/dino at commit 7c446df (sha256 sums in
``benchmarks/gpu/reference_dino.sha256``, which also says where they come from), and prints the device tool's calls:
the command, the ignored paths that must travel beside the tree (``carry``) and the time limit of each.
Exit code 2 with one line per problem when something is missing or differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUMS = Path(__file__).resolve().parent / "reference_dino.sha256"
CARRY = [".whl", ".ffcv_carry", ".reference"]
CARRY_LIMIT = 64 * 2**20  # what the device tool carries beside the tree, in all
# (command, its own deadline in seconds, the device tool's timeout_s: the deadline plus start-up and copy margin)
CALLS = [("bash benchmarks/gpu/gpu_check.sh", 480, 540), ("bash benchmarks/gpu/gpu_check.sh data", 240, 300)]


def read_sums(path: Path = SUMS) -> dict[str, str]:
    """``{file name: sha256}`` from a sha256sum-format file (``#`` lines are comments)."""
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def check_reference(folder: Path, sums: dict[str, str]) -> list[str]:
    """One line per reference file that is missing or differs from its recorded sum."""
    problems = []
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            problems.append(f"{f} is missing (see {SUMS.relative_to(REPO)} for where it comes from)")
        elif hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            problems.append(f"{f} differs from facebookresearch/dino at 7c446df (sha256 mismatch): copy it again")
    return problems


def carry_bytes(repo: Path = REPO) -> int:
    return sum(f.stat().st_size for d in CARRY for f in (repo / d).rglob("*") if f.is_file())


def check_carry(repo: Path = REPO) -> list[str]:
    problems = []
    if carry_bytes(repo) > CARRY_LIMIT:
        problems.append(f"{', '.join(CARRY)} hold {carry_bytes(repo) / 2**20:.1f} MiB, more than the device tool "
                        f"carries ({CARRY_LIMIT / 2**20:.0f} MiB): remove what is not needed")
    if not list((repo / ".whl").glob("deepspeed-*.whl")):
        problems.append(".whl/ holds no deepspeed wheel: run `make gpu-wheels`")
    if not (repo / ".ffcv_carry" / "site" / "ffcv").is_dir():
        problems.append(".ffcv_carry/ is missing: run `make ffcv-carry`")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", default=str(REPO / ".reference" / "dino"))
    p.add_argument("--no-carry-check", action="store_true", help="check the reference files only")
    args = p.parse_args(argv)
    problems = check_reference(Path(args.reference), read_sums())
    if not args.no_carry_check:
        problems += check_carry()
    for line in problems:
        print(f"gpu-prep: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"gpu-prep: ready ({carry_bytes() / 2**20:.1f} MiB to carry of {CARRY_LIMIT / 2**20:.0f}). The device "
          "tool's calls (the first is the decision run, the second is optional):")
    for command, deadline, timeout in CALLS:
        print("  run " + json.dumps({"command": command, "carry": CARRY, "timeout_s": timeout})
              + f"   # its own deadline: {deadline} s")
    print("  Results come back under $OUT (≤ 8 files each); commit them under benchmarks/results/<device>/.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
