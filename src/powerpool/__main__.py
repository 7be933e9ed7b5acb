"""``python -m powerpool``: the same command line as ``powerpool``."""

from ._cli.app import main

if __name__ == "__main__":
    main()
