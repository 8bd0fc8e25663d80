"""Commands (`python -m scalejax.cli.NAME --help`): each a module with `main()`; none imports another."""
