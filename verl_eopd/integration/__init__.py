"""verl glue: the EOPD config, the loss bound in the EOPD worker, the teacher in the reference worker, the
v1 trainer, the server route, and the one registry of runtime patches. Importing this package (or any of
its modules) registers nothing; the plugin's `setup()` does (verl_eopd/plugin.py)."""
