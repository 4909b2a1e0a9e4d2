"""`python -m dashboard [--config FILE] [--host H] [--port P]`: the same as `infinitetalk dashboard`."""

import argparse
import sys

from dashboard import server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m")  # the sub-command adds " dashboard"
    server.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
