"""The sampling CLI as a script: `python sample/sample.py ...` is `python -m promoe.sample ...` (see there)."""

from promoe.sample import main

if __name__ == "__main__":
    main()
