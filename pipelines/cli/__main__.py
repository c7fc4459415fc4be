"""``python -m pipelines.cli``: the ``ehr`` command line."""

from pipelines.cli import main

if __name__ == "__main__":
    main()
