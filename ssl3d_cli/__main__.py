"""Entry point for ``python -m ssl3d_cli`` and ``torchrun -m ssl3d_cli``."""

from ssl3d_cli.cli.app import main

if __name__ == "__main__":
    main()
