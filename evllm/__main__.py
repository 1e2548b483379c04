"""`python -m evllm ...` == `evllm ...` (the container runs `python -m evllm serve`)."""

from evllm.cli import main

if __name__ == "__main__":
    main()
