"""The math task: datasets to verl parquet, the verifiable reward, Avg@k/Pass@k evaluation, training curves
and seed statistics, and the mini reproduction."""
