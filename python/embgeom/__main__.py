import sys

try:  # Ctrl-C while the package imports torch: one line, as in the command itself
    from .cli import main
except KeyboardInterrupt:
    print("embgeom: interrupted before the command started: nothing was written", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
