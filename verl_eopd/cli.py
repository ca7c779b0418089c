"""`python -m verl.trainer.main algorithm=eopd [overrides]` runs this file (integration/verl_main_alias.py): the
same run as `python -m verl_eopd.main`. Absolute imports only: it executes under the name verl.trainer.main."""

from verl_eopd.main import main

if __name__ == "__main__":
    main()
