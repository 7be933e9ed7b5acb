"""``python -m powerpool``: the same command line as ``powerpool``."""

from ._cli import main

if __name__ == "__main__":
    main()
