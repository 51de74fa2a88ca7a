"""``python -m xffl_tasks.verify CAMPAIGN_DIR``: checks a campaign's manifest chain.

Exit status 0 when every round's manifest links to the previous one by sha256 and every
recorded output file still matches; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import sys

from xffl_tasks.manifest import round_dirs, verify_campaign, warm_start_lineage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xffl_tasks.verify", description=__doc__.splitlines()[0])
    parser.add_argument("campaign_dir", help="the campaign folder: <storage>/<campaign>")
    parser.add_argument("--no-files", action="store_true", help="check the chain only, not the output files")
    args = parser.parse_args(argv)
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
