"""Commands (`python -m scalejax.cli.NAME --help`): each a module with `main(argv)` and `run()`,
none importing another; `common` is the helper they share, not a command."""
