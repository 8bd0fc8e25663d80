"""Commands (`python -m scalejax.cli.NAME --help`): each a module with `main(argv)` and `run()`,
none importing another; `common` holds what they share and is not a command."""
