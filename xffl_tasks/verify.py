"""``python -m xffl_tasks.verify PATH``: checks a campaign's manifest chain, or a release.

PATH is a campaign folder (``<storage>/<campaign>``), a release folder (``<releases_root>/
<federation>/<n>``, the one holding ``release.json``: its files, its links to the previous
release and to the campaign's chain, and the choice of round; ``xffl_tasks.release.verify``),
or a federation's releases folder (``<releases_root>/<federation>``: every release in it).
Exit status 0 when everything verifies; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xffl_tasks.manifest import round_dirs, verify_campaign, warm_start_lineage


def _verify_release(path: Path, *, check_files: bool) -> tuple[list[str], str]:
    from xffl_tasks.release.publish import release_numbers
    from xffl_tasks.release.verify import is_release_folder, verify_release, verify_releases

    if is_release_folder(path):
        return verify_release(path, check_files=check_files), (
            f"release {path.name} of {path.parent.name}: files, links and the choice of round intact"
        )
    numbers = release_numbers(path)
    return verify_releases(path, check_files=check_files), (
        f"{len(numbers)} release(s) of {path.name}: files, links and the choices of round intact"
    )


def _is_releases(path: Path) -> bool:
    from xffl_tasks.release.publish import release_numbers
    from xffl_tasks.release.verify import is_release_folder

    if is_release_folder(path):
        return True
    return path.is_dir() and not round_dirs(path) and any(
        is_release_folder(path / str(n)) for n in release_numbers(path)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xffl_tasks.verify", description=__doc__.splitlines()[0])
    parser.add_argument("campaign_dir", metavar="PATH",
                        help="a campaign folder <storage>/<campaign>, a release folder, or a federation's releases")  # fmt: skip
    parser.add_argument("--no-files", action="store_true", help="check the chain only, not the output files")
    args = parser.parse_args(argv)
    path = Path(args.campaign_dir)
    if _is_releases(path):
        problems, summary = _verify_release(path, check_files=not args.no_files)
        if problems:
            for problem in problems:
                print(f"FAIL {problem}", file=sys.stderr)
            return 1
        print(f"OK {path}: {summary}")
        return 0
    problems = verify_campaign(args.campaign_dir, check_files=not args.no_files)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        return 1
    count = len(round_dirs(args.campaign_dir))
    lineage = "".join(f"; warm-started from {name} round {number}" for name, number in warm_start_lineage(args.campaign_dir))
    print(f"OK {args.campaign_dir}: {count} round(s), manifest chain intact{lineage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
