"""Container entrypoint: `python -m predictors [flags]` == `evllm serve [flags]`."""

from predictors.server import main

if __name__ == "__main__":
    main()
