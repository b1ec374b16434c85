"""``python -m factory.cli``, e.g. under accelerate launch."""

from factory.cli import main

main()
