"""The Hydra configs of verl-eopd (a package so that Hydra finds them by module name when the command runs
under another name, e.g. python -m verl.trainer.main)."""
