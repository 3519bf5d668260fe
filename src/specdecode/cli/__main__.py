"""``python -m specdecode.cli``: the `specdecode` command (``bench-serve`` starts servers so)."""

from specdecode.cli import main

if __name__ == "__main__":
    main()
